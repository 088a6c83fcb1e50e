"""Two-process DDP on CPU (gloo): identical rank decisions, one writer, resume, same result as one process, compiled.

The run (tests/ddp_train.py) is a tiny GPT-2 with InRank on the MLP: ranks grow from step 4 and
stage 2 truncates them at step 8 of 16, replacing the factors (new shapes), so the trainer
must rebuild the optimizer groups and re-wrap the model in DDP on every process.
"""

import json
from pathlib import Path

import pytest

import launch as launcher

SCRIPT = Path(__file__).with_name("ddp_train.py")


def launch(out: Path, nproc: int, batch: int, resume: str | None = None, compile_: bool = False) -> list[dict]:
    """Run ddp_train.py on ``nproc`` processes; returns each process's record."""
    args = [str(SCRIPT), str(out), str(batch), *([resume] if resume else []), *(["--compile"] if compile_ else [])]
    launcher.run(launcher.torchrun(nproc), args)
    return [json.loads((out / f"process-{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow
def test_two_processes_agree_and_match_one_process(tmp_path):
    two = launch(tmp_path / "two", nproc=2, batch=4)
    assert [p["world_size"] for p in two] == [2, 2]
    assert two[0]["ddp"] == "DistributedDataParallel", "the model was re-wrapped in DDP after stage 2"
    assert two[0]["rank_pattern"] == two[1]["rank_pattern"]
    assert two[0]["strategy_state"] == two[1]["strategy_state"]
    assert two[0]["strategy_state"]["frozen"], "stage 2 happened"
    assert all(spec["rank"] == spec["capacity"] for spec in two[0]["rank_pattern"].values()), "buffers were dropped"
    assert max(spec["rank"] for spec in two[0]["rank_pattern"].values()) > 2, "ranks grew before stage 2"

    # checkpoints: written once, by process 0 only, and complete
    assert len(two[0]["writes"]) == 4 and two[1]["writes"] == []
    checkpoints = sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-12", "checkpoint-16", "checkpoint-4", "checkpoint-8"]
    assert not list((tmp_path / "two").glob(".staging-*"))
    for name in checkpoints:
        assert {"lowrank_config.json", "model.safetensors", "optimizer.pt", "lowrank_trainer_state.json"} <= {
            p.name for p in (tmp_path / "two" / name).iterdir()
        }

    # resume from before stage 2's aftermath: the same losses and ranks as the uninterrupted run
    resumed = launch(tmp_path / "two", nproc=2, batch=4, resume=str(tmp_path / "two" / "checkpoint-8"))
    assert resumed[0]["rank_pattern"] == two[0]["rank_pattern"] == resumed[1]["rank_pattern"]
    for step in ("12", "16"):
        assert resumed[0]["losses"][step] == pytest.approx(two[0]["losses"][step], rel=1e-4)

    # one process with the same global batch follows the same loss curve
    one = launch(tmp_path / "one", nproc=1, batch=8)
    steps = sorted(one[0]["losses"], key=int)
    assert len(steps) == 16
    assert [two[0]["losses"][s] for s in steps] == pytest.approx([one[0]["losses"][s] for s in steps], rel=2e-2)

    # torch_compile=True: Accelerate compiles the DDP wrapper, so stage 2 re-wraps inside the compiled
    # module; a DDP left around the replaced parameters fails in the next backward
    compiled = launch(tmp_path / "compiled", nproc=2, batch=4, compile_=True)
    assert [p["compiled"] for p in compiled] == [True, True] and compiled[0]["ddp"] == "DistributedDataParallel"
    assert compiled[0]["rank_pattern"] == compiled[1]["rank_pattern"] == two[0]["rank_pattern"]
    assert [compiled[0]["losses"][s] for s in steps] == pytest.approx([two[0]["losses"][s] for s in steps], rel=1e-4)
