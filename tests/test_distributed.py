"""Two-process DDP on CPU (gloo): identical rank decisions, one writer, resume, same result as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_train.py")


def launch(out: Path, nproc: int, batch: int, resume: str | None = None) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(29500 + os.getpid() % 1000), str(SCRIPT), str(out), str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd + ([resume] if resume else []), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"process-{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow
def test_two_processes_agree_and_match_one_process(tmp_path):
    two = launch(tmp_path / "two", nproc=2, batch=4)
    assert [p["world_size"] for p in two] == [2, 2]
    assert two[0]["ddp"] == "DistributedDataParallel", "the model was re-wrapped in DDP after stage 2"
    assert two[0]["rank_pattern"] == two[1]["rank_pattern"]
    assert two[0]["strategy_state"] == two[1]["strategy_state"]
    assert all(spec["rank"] == spec["capacity"] for spec in two[0]["rank_pattern"].values()), "stage 2 happened"
    checkpoints = sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-12", "checkpoint-16", "checkpoint-4", "checkpoint-8"]
    assert not list((tmp_path / "two").glob(".staging-*"))

    one = launch(tmp_path / "one", nproc=1, batch=8)  # the same global batch
    steps = sorted(one[0]["losses"], key=int)
    two_losses = [two[0]["losses"][s] for s in steps]
    one_losses = [one[0]["losses"][s] for s in steps]
    assert two_losses == pytest.approx(one_losses, rel=2e-2)

    resumed = launch(tmp_path / "two", nproc=2, batch=4, resume=str(tmp_path / "two" / "checkpoint-8"))
    assert resumed[0]["rank_pattern"] == two[0]["rank_pattern"] == resumed[1]["rank_pattern"]
    for step in ("12", "16"):
        assert resumed[0]["losses"][step] == pytest.approx(two[0]["losses"][step], rel=1e-4)
