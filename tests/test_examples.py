"""examples/ runs as a user runs it: each file for a few steps of a tiny model, then its saved model loads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import transformers

from hf_lowrank import LowRankModel

sys.path.insert(0, str(Path(__file__).parent))
import launch  # noqa: E402

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
# InRank with its defaults: 12 steps are enough for growth and stage 2 (a shape change: DDP is rebuilt)
TINY = [
    "--dataset", "synthetic", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
    "--vocab-size", "300", "--batch-size", "4", "--max-steps", "12", "--eval-batches", "2", "--log-every", "4",
]


def run_example(name: str, out: Path, launcher=None, **env_vars: str) -> str:
    """Run examples/<name> in one plain process, or under ``launcher`` (launch.accelerate_launch)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = launch.run(launcher or (lambda port: [sys.executable]), [str(EXAMPLES / name), *TINY, "--out", str(out)], cwd=out.parent, **env_vars)
    assert "InRank stage 2" in proc.stdout and f"saved {out / 'final'}" in proc.stdout, proc.stdout
    return proc.stdout


def check_saved(folder: Path) -> None:
    model = LowRankModel.from_pretrained(folder)
    pattern = model.rank_pattern()
    assert pattern and all(s["mode"] == "factorized" and s["rank"] == s["capacity"] for s in pattern.values())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tokenizer(["the nation needs peace ."], return_tensors="pt")).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def losses(stdout: str) -> list[str]:
    return re.findall(r"loss (\d+\.\d+)", stdout)


def test_the_examples_train_save_and_load_and_agree_in_one_process(tmp_path):
    plain = run_example("train_pytorch.py", tmp_path / "pytorch")
    check_saved(tmp_path / "pytorch" / "final")
    accelerate = run_example("train_accelerate.py", tmp_path / "accelerate")
    assert "1 process(es)" in accelerate
    check_saved(tmp_path / "accelerate" / "final")
    assert len(losses(plain)) == 4 and losses(accelerate) == losses(plain), "one process: the same run"


@pytest.mark.slow
def test_the_accelerate_example_runs_on_two_processes(tmp_path):
    launcher = launch.accelerate_launch(ROOT / "recipes" / "accelerate" / "cpu_2proc_gloo.yaml")
    # accelerate's multi-GPU launcher does not pass the config's use_cpu on; a plain Accelerator() reads it from here
    stdout = run_example("train_accelerate.py", tmp_path / "two", launcher, ACCELERATE_USE_CPU="true")
    assert "2 process(es)" in stdout and stdout.count("saved ") == 1, "process 0 prints and saves"
    check_saved(tmp_path / "two" / "final")
