"""Runs docs/trainer.md's two loops as written, in one process or several.

    python tests/docs_loops.py {pytorch,accelerate} OUT
    torchrun --nproc_per_node 2 tests/docs_loops.py pytorch OUT
    accelerate launch --config_file recipes/accelerate/cpu_2proc_gloo.yaml tests/docs_loops.py accelerate OUT

The script defines what the docs leave to the reader (``base``: a tiny GPT-2, ``loader``: 60
batches, more than ``max_steps=24``; under torchrun a ``DistributedSampler`` gives each process
its share), runs the block, and writes each process's losses, rank pattern, applied plans and
wrapper type to OUT/process-<rank>.json.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from helpers_train import TokenDataset, tiny_gpt2  # noqa: E402

HEADINGS = {"pytorch": "## A plain PyTorch loop", "accelerate": "## A plain Accelerate loop"}
MAX_STEPS, BATCHES, BATCH = 24, 60, 4


def block(which: str) -> str:
    text = (ROOT / "docs" / "trainer.md").read_text()
    return re.search(re.escape(HEADINGS[which]) + r".*?```python\n(.*?)```", text, re.S).group(1)


def instrumented(code: str) -> str:
    """The block with one line added after its update_ranks line: record the step's loss and plan."""
    lines = code.splitlines()
    at = next(i for i, line in enumerate(lines) if ".update_ranks(" in line)
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    lines.insert(at + 1, f"{indent}record(step, plan)")
    return "\n".join(lines) + "\n"


def main(which: str, out: str) -> None:
    torch.set_num_threads(1)
    if which == "pytorch" and "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    data = TokenDataset(n=BATCHES * BATCH * 2)
    sampler = None
    if torch.distributed.is_initialized():
        sampler = torch.utils.data.DistributedSampler(data, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)
    steps, plans = [], []

    def record(step, plan):
        steps.append(step)
        if plan is not None:
            plans.append({"step": step, "changes_shapes": plan.changes_shapes, "reason": plan.reason})

    ns = {"base": tiny_gpt2(), "loader": loader, "max_steps": MAX_STEPS, "record": record}
    exec(compile(instrumented(block(which)), f"docs/trainer.md ({which} loop)", "exec"), ns)
    model = ns["model"]
    lowrank = ns.get("lowrank", model)
    net = ns.get("net", model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with torch.no_grad():
        eval_loss = lowrank.eval()(**next(iter(torch.utils.data.DataLoader(data, batch_size=8)))).loss.item()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"process-{rank}.json").write_text(
        json.dumps(
            {
                "world_size": world, "steps": steps, "plans": plans, "eval_loss": eval_loss,
                "rank_pattern": lowrank.rank_pattern(), "wrapper": type(net).__name__,
                "lr": [g["lr"] for g in ns["optimizer"].param_groups],
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
