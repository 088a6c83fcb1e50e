"""benchmarks/gpu.sh end to end on CPU at the smallest size that runs every row, so the one-command GPU benchmark cannot rot.

The script runs as on the GPU machine (its dependency check, ``benchmarks.run`` with its four
rows, the report and plots, its closing line) with ``--set`` overrides: one block of width 16, 6
steps (the compiled row runs 2), an eager ``torch.compile`` backend. Every row kind still runs:
dense, InRank through stage 2 (a shape change), the warm start at InRank's final rank, and a
compiled row. The test reads the JSON files the script writes.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_lowrank.files import read_json

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
TINY = {
    "device": "cpu", "threads": 1, "compile_backend": "eager", "dataset": "synthetic", "n_layer": 1, "n_embd": 16,
    "n_head": 2, "block_size": 8, "vocab_size": 260, "max_eval_tokens": 64, "max_steps": 6,
    "per_device_train_batch_size": 2, "warmup_steps": 1, "eval_steps": 3, "logging_steps": 3, "skip_steps": 1,
}
ROWS = {"full": 6, "inrank": 6, "warm_start": 6, "full_compiled": 2}  # row -> its optimizer steps
NUMBERS = (
    "eval_loss", "perplexity", "tokens_per_second", "train_seconds", "steady_seconds", "peak_memory_bytes", "trainable_params",
    "total_params", "flops_per_token_run", "flops_per_token_final", "flops_per_token_dense", "train_flops",
)


def numbers(value):
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.mark.slow
def test_gpu_script_runs_every_row_kind_and_writes_its_files(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        # OUT_DIR relative to the caller's folder; one process for all rows keeps the test short
        ["bash", str(SCRIPT), "bench", "--in-process", *(f"--set={k}={v}" for k, v in TINY.items())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # each row's line as it finishes, then the script's own closing line
    for i, label in enumerate(["full rank", "InRank-Efficient", "warm start (Kamalakara)", "full rank, torch.compile"], 1):
        assert f"[{i}/4] {label} (lr 0.0006): ppl" in proc.stdout
    assert "s in all, report in" in proc.stdout

    meta = read_json(out / "benchmark.json")
    assert meta["scale"] == "gpu" and meta["rows"] == list(ROWS)
    assert {k: meta["settings"][k] for k in TINY} == TINY and meta["settings"]["bf16"] is True  # the scale's, unless overridden
    for name, steps in ROWS.items():
        metrics = read_json(out / "rows" / name / "metrics.json")
        assert metrics["name"] == name and metrics["max_steps"] == steps and metrics["compiled"] is (name == "full_compiled")
        assert metrics["recipe_options"]["bf16"] is True and metrics["recipe_options"]["n_layer"] == 1
        assert all(isinstance(metrics[k], (int, float)) and metrics[k] > 0 for k in NUMBERS), {k: metrics.get(k) for k in NUMBERS}
        assert all(math.isfinite(n) for n in numbers(metrics)), f"{name}: a number that is not finite"
        assert metrics["time_to_quality"]["target_perplexity"] == pytest.approx(read_json(out / "rows" / "full" / "metrics.json")["perplexity"])
        history = read_json(out / "rows" / name / "log_history.json")
        assert any("eval_loss" in e for e in history) and all(math.isfinite(n) for n in numbers(history))
        pattern = read_json(out / "rows" / name / "rank_pattern.json")
        assert len(pattern) == 4 and all({"mode", "rank", "full_rank"} <= set(p) for p in pattern.values())
    inrank = read_json(out / "rows" / "inrank" / "metrics.json")
    assert any("stage 2" in p["reason"] for p in inrank["plans"]), inrank["plans"]
    pattern = read_json(out / "rows" / "inrank" / "rank_pattern.json").values()
    fraction = sum(p["rank"] for p in pattern) / sum(p["full_rank"] for p in pattern)
    warm = read_json(out / "rows" / "warm_start" / "metrics.json")
    assert warm["lowrank_config"]["rank"] == pytest.approx(fraction, abs=1e-4), "the warm start runs at InRank's final rank"
    assert any("dense -> factorized" in p["reason"] for p in warm["plans"])

    report = (out / "report.md").read_text()
    assert "# Benchmark: gpu scale" in report and "## Time to quality and training FLOPs" in report
    assert (out / "log.txt").read_text().count("tok/s") >= 4 and (out / "eval_loss.png").stat().st_size > 1000


def test_gpu_script_needs_an_output_folder():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: benchmarks/gpu.sh OUT_DIR" in proc.stderr
