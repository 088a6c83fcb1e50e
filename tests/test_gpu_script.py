"""benchmarks/gpu.sh end to end on CPU with a tiny override, so the one-command GPU benchmark cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_lowrank.files import read_json

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
TINY = {
    "device": "cpu", "threads": 1, "compile_backend": "eager", "dataset": "synthetic", "n_layer": 2, "n_embd": 32,
    "n_head": 2, "block_size": 16, "vocab_size": 300, "max_eval_tokens": 256, "max_steps": 6,
    "per_device_train_batch_size": 4, "warmup_steps": 1, "eval_steps": 3, "logging_steps": 3, "skip_steps": 1,
}


@pytest.mark.slow
def test_gpu_script_runs_its_rows_and_writes_the_report(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        # OUT_DIR relative to the caller's folder; one process for all rows keeps the test short
        ["bash", str(SCRIPT), "bench", "--in-process", *(f"--set={k}={v}" for k, v in TINY.items())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # each row's line, with its time, as it finishes; then the total
    for i, label in enumerate(["full rank", "InRank-Efficient", "warm start (Kamalakara)", "full rank, torch.compile"], 1):
        assert f"[{i}/4] {label} (lr 0.0006): ppl" in proc.stdout
    assert "s in all, report in" in proc.stdout and (out / "log.txt").read_text().count("tok/s") >= 4
    report = (out / "report.md").read_text()
    assert "# Benchmark: gpu scale" in report and "## Time to quality and training FLOPs" in report
    assert "FLOP speedup (run)" in report and "peak memory" in report
    for name in ("full", "inrank", "warm_start", "full_compiled"):
        metrics = read_json(out / "rows" / name / "metrics.json")
        assert metrics["recipe_options"]["bf16"] and metrics["recipe_options"]["n_layer"] == 2
    assert read_json(out / "rows" / "warm_start" / "metrics.json")["lowrank_config"]["rank"] < 1.0  # InRank's final rank
    assert (out / "eval_loss.png").stat().st_size > 1000


def test_gpu_script_needs_an_output_folder():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: benchmarks/gpu.sh OUT_DIR" in proc.stderr
