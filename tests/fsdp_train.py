"""A user's own training loop under FSDP2 and under DDP, with rank changes, for tests/test_fsdp.py.

    torchrun --nproc_per_node 2 tests/fsdp_train.py OUT SCENARIO

One launch runs, on every process, for the scenario's strategy (a tiny GPT-2 without dropout,
global batch 8 split over the processes):

1. FSDP2 (``fully_shard`` per block and on the root), ``model.update_ranks`` after every
   step, a checkpoint (``hf_lowrank.fsdp.save_checkpoint``) after step SAVE_AT;
2. the same run resumed from that checkpoint on a fresh model (sharded first, then
   ``load_checkpoint``), to the end;
3. DDP on the same data, re-wrapped after every plan that replaced parameters.

Each process writes OUT/process-<rank>.json: per run its per-step losses (mean over all
processes), rank patterns after each plan, and what the sharding looked like after it.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(__file__))
from helpers_train import wide_gpt2, wide_tokens  # noqa: E402

from hf_lowrank import LowRankConfig, get_lowrank_model, optim  # noqa: E402
from hf_lowrank import fsdp as lowrank_fsdp  # noqa: E402
from hf_lowrank.distributed import rewrap_ddp  # noqa: E402

STEPS = 12
GLOBAL_BATCH = 8
MLP = {"target_modules": ["c_fc", "c_proj"], "exclude_modules": r".*attn.*"}
SCENARIOS = {
    # InRank: ranks grow from step 4, stage 2 truncates at step 6 and freezes them.
    "inrank": ({"strategy": "inrank", "strategy_args": {"warmup_steps": 4, "interval": 2, "stage2_at": 0.5}}, 8),
    # InRank with preconditioned factors: the factors and their gradient shards are gathered every step;
    # every 3 steps the factor pairs are re-balanced and Adam's moments rotated (gathered, re-split whole, written back as shards).
    "inrank_precondition": (
        {"strategy": "inrank", "precondition": True, "rebalance_every": 3, "rebalance_moments": "rotate", "strategy_args": {"warmup_steps": 4, "interval": 2, "stage2_at": 0.5}}, 8,
    ),
    # Cuttlefish: dense, stable ranks measured every 2 steps, every layer factorized at the switch (step 6 at the latest).
    "cuttlefish": (
        {"strategy": "cuttlefish", "strategy_args": {"measure_every": 2, "window": 2, "mean_over": 2, "max_dense_steps": 6, "select_layers": "all"}},
        8,
    ),
    # Dynamic: factorized, inflated to dense after step 4, deflated to frozen base + adapter after step 8;
    # the checkpoint at step 6 is dense, so the resumed run deflates.
    "dynamic": (
        {"strategy": "dynamic", "strategy_args": {"rank": 0.25, "inflate_at": 4, "deflate_at": 8, "check_schedule": False}},
        6,
    ),
}


def build(scenario: str):
    return get_lowrank_model(wide_gpt2(dropout=0.0), LowRankConfig(**MLP, **SCENARIOS[scenario][0]))  # no dropout: runs compare step for step


def make_optimizer(model):
    opt = torch.optim.AdamW(optim.param_groups(model, lr=3e-3, weight_decay=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / STEPS)
    return opt, sched


def shard(model):
    for block in model.base_model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def layout(model) -> dict:
    """What the sharding looks like: every parameter a DTensor, and the global shape of each factor."""
    params = dict(model.named_parameters())
    return {
        "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
        "shapes": {n: list(p.shape) for n, p in params.items() if "mlp" in n},
    }


def train(model, opt, sched, data, start: int, rank: int, world: int, mode: str, out: str | None, save_at: int | None):
    """Steps start+1 .. STEPS; returns per-step losses and a record per applied plan."""
    per = GLOBAL_BATCH // world
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    losses, plans = {}, []
    for step in range(start + 1, STEPS + 1):
        rows = data[((step - 1) * GLOBAL_BATCH) % len(data):][:GLOBAL_BATCH][rank * per:(rank + 1) * per]
        loss = wrapped(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ids_before = {n: id(p) for n, p in model.named_parameters()}
        plan = model.update_ranks(step, opt, sched)
        if plan is not None and plan.changes_shapes and mode == "ddp":
            wrapped = rewrap_ddp(wrapped)
        if plan:
            kept = sum(ids_before.get(n) == id(p) for n, p in model.named_parameters())
            trainable = [p for p in model.parameters() if p.requires_grad]
            in_opt = {id(p) for g in optim.inner_optimizer(opt).param_groups for p in g["params"]}
            plans.append({
                "step": step, "ops": sorted({c.op for c in plan.changes}), "pattern": model.rank_pattern(),
                "kept_params": kept, "params": len(ids_before), "optimizer_matches": in_opt == {id(p) for p in trainable},
                "with_state": sum(p in opt.state for p in trainable), **(layout(model) if mode == "fsdp" else {}),
            })
        value = loss.detach().clone()
        dist.all_reduce(value)
        losses[step] = value.item() / world
        if step == save_at:
            lowrank_fsdp.save_checkpoint(model, opt, out, sched, step=step)
    return losses, plans


def main(out: str, scenario: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = wide_tokens().x
    save_at = SCENARIOS[scenario][1]
    folder = os.path.join(out, f"checkpoint-{save_at}")
    record = {}

    torch.manual_seed(1)
    model = build(scenario)
    shard(model)
    opt, sched = make_optimizer(model)
    model.bind_training(STEPS, opt, sched)
    record["fsdp"] = train(model, opt, sched, data, 0, rank, world, "fsdp", folder, save_at)
    record["fsdp_final"] = model.rank_pattern()
    record["strategy_state"] = model.strategy.state_dict()

    torch.manual_seed(2)  # a different random state: the checkpoint must bring back process 0's
    model = build(scenario)
    shard(model)
    opt, sched = make_optimizer(model)
    lowrank_fsdp.load_checkpoint(model, opt, folder, sched)
    model.bind_training(STEPS, opt, sched)
    record["resumed"] = train(model, opt, sched, data, save_at, rank, world, "fsdp", None, None)
    record["resumed_final"] = model.rank_pattern()

    torch.manual_seed(1)
    model = build(scenario)
    opt, sched = make_optimizer(model)
    model.bind_training(STEPS, opt, sched)
    record["ddp"] = train(model, opt, sched, data, 0, rank, world, "ddp", None, None)
    record["ddp_final"] = model.rank_pattern()

    with open(os.path.join(out, f"process-{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
