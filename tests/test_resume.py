"""Resuming a LowRankTrainer run continues the same run; a rank change keeps what it promises.

The runs are tests/helpers_train.py's InRank run: gradient accumulation 2, float32 (bf16 off),
growth checks every 2 steps from step 2, stage 2 (truncation, a shape change) at step 8 of 16,
a checkpoint every 4 steps.
"""

import pytest
import torch
import transformers
from helpers_train import TokenDataset, build_trainer, record, run

from hf_lowrank import LowRankConfig, optim
from hf_lowrank.strategies import REGISTRY, LayerChange, Plan

VARIANTS = {
    "factorized": {"mode": "factorized"},  # InRank-Efficient, the authors' code
    "residual": {"mode": "residual", "residual_base": "orthogonal"},  # the paper's W0 + B A over an orthogonal W0
    # Re-balanced every 3 steps with the moments reset: the resumed run re-splits at the same steps
    # (skipping pairs with freshly grown zero components) and drops the same optimizer state.
    "rebalanced": {"mode": "factorized", "rebalance_every": 3, "rebalance_moments": "reset", "factor_weight_decay": 0.0},
}
STAGE2 = 8


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def uninterrupted(request, tmp_path_factory):
    """One uninterrupted run per variant, shared by the resume points."""
    out = tmp_path_factory.mktemp(f"full-{request.param}")
    return request.param, out, run(out, lowrank=VARIANTS[request.param])


def assert_same_run(resumed: dict, full: dict, after: int) -> None:
    """Losses of every step after ``after``, final ranks, strategy state and plan steps agree."""
    later = [s for s in full["losses"] if int(s) > after]
    assert later and all(s in resumed["losses"] for s in later), (later, sorted(resumed["losses"]))
    # The same float32 CPU computation in the same order: equal up to rounding.
    torch.testing.assert_close(
        [resumed["losses"][s] for s in later], [full["losses"][s] for s in later], rtol=1e-4, atol=1e-6
    )
    assert resumed["rank_pattern"] == full["rank_pattern"]
    assert resumed["strategy_state"] == full["strategy_state"]
    assert resumed["plan_steps"] == full["plan_steps"]


@pytest.mark.parametrize("resume_at", [4, STAGE2, 12])  # growing; right after the truncation; frozen
def test_resume_continues_the_same_run(uninterrupted, resume_at, tmp_path):
    mode, full_dir, full = uninterrupted
    assert any(s < STAGE2 for s in full["plan_steps"]) and STAGE2 in full["plan_steps"], "ranks grew, then stage 2"
    checkpoint = full_dir / f"checkpoint-{resume_at}"
    saved = LowRankConfig.from_pretrained(checkpoint).rank_pattern
    if resume_at < STAGE2:
        assert all(spec["capacity"] > spec["rank"] for spec in saved.values()), "capacity and buffer are kept"
    else:
        assert all(spec["capacity"] == spec["rank"] for spec in saved.values()), "saved after the truncation"
    resumed = run(tmp_path, resume=str(checkpoint), lowrank=VARIANTS[mode])
    assert_same_run(resumed, full, after=resume_at)


def test_checkpoints_are_renamed_into_place(uninterrupted):
    _, full_dir, _ = uninterrupted
    assert sorted(p.name for p in full_dir.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (12, 16, 4, 8)]
    assert not list(full_dir.glob(".*")), "no staging or temporary folder is left behind"
    assert (full_dir / "checkpoint-4" / "lowrank_trainer_state.json").is_file()


# -- what a rank change does to the function and to the optimizer ---------------------------


@pytest.fixture
def trained(tmp_path):
    """A trainer after 4 optimizer steps (Adam moments exist) and no rank change yet.

    The fixed strategy at InRank's starting layout (r + b = 2 + 4 = 6 of capacity 16): nothing
    changes on its own, the tests apply plans by hand.
    """
    trainer = build_trainer(
        tmp_path, {"strategy": "fixed", "strategy_args": {}, "rank": 6, "capacity": 16}, max_steps=4, save_strategy="no"
    )
    trainer.train()
    assert not trainer.plan_history
    return trainer


def fixed_batch_loss(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**TokenDataset()[:8]).loss


def moments(trainer) -> dict:
    """``{parameter: (state dict, its tensors, their values)}`` of every parameter with optimizer state."""
    opt = optim.inner_optimizer(trainer.optimizer)
    return {p: (s, {k: v for k, v in s.items()}, {k: v.clone() for k, v in s.items()}) for p, s in opt.state.items()}


def test_growth_keeps_the_loss_and_the_optimizer_state(trained):
    layers = trained.model.lowrank_layers()
    before_loss, before = fixed_batch_loss(trained.model), moments(trained)
    params = dict(trained.model.named_parameters())
    plan = Plan([LayerChange(n, "grow", rank=layer.rank + 3) for n, layer in layers.items()])
    trained.apply_plan(plan, step=trained.state.global_step)
    assert all(layer.rank == 9 < layer.capacity for layer in layers.values()), "6, plus 3"

    # Newly active components have B = 0: the function is the same up to summation order.
    torch.testing.assert_close(fixed_batch_loss(trained.model), before_loss, rtol=1e-6, atol=1e-7)
    assert all(p is params[n] for n, p in trained.model.named_parameters()), "growing replaces no parameter"
    opt = optim.inner_optimizer(trained.optimizer)
    assert set(opt.state) == set(before)
    for p, (state, tensors, values) in before.items():
        assert opt.state[p] is state and all(opt.state[p][k] is t for k, t in tensors.items()), "same tensors"
        for k, v in values.items():
            torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0)


def test_truncation_resets_only_the_truncated_factors(trained):
    name = "transformer.h.0.mlp.c_fc"
    layer = trained.model.lowrank_layers()[name]
    old = {id(layer.A), id(layer.B)}
    before = moments(trained)
    untouched = [p for p in before if id(p) not in old]
    trained.apply_plan(Plan([LayerChange(name, "truncate", rank=3)]), step=trained.state.global_step)

    opt = optim.inner_optimizer(trained.optimizer)
    assert layer.rank == layer.capacity == 3
    assert not {id(p) for p in opt.state} & old, "the old factors' moments are dropped"
    assert layer.A not in opt.state and layer.B not in opt.state, "the new factors start with no moments"
    factor_group = next(g for g in opt.param_groups if any(p is layer.A for p in g["params"]))
    assert factor_group.get("lowrank_factors") and any(p is layer.B for p in factor_group["params"])
    for p in untouched:
        assert opt.state[p] is before[p][0] and all(opt.state[p][k] is t for k, t in before[p][1].items())

    # One more step: the truncated factors restart Adam's bias correction, the rest go on.
    trained.model.train()
    trained.model(**TokenDataset()[:8]).loss.backward()
    opt.step()
    assert int(opt.state[layer.A]["step"]) == int(opt.state[layer.B]["step"]) == 1
    assert all(int(opt.state[p]["step"]) == 5 for p in untouched)


# -- resuming with the same trainer object (a notebook, a retry after an error) -------------------

SAME_TRAINER_STEPS, SAME_TRAINER_SAVE = 24, 4


# Settings that make each strategy change the layout after a checkpoint of a 24-step run.
SAME_TRAINER_ARGS = {"cuttlefish": {"select_layers": "all"}, "warm_start": {"dense_steps": 0.5}, "inrank": {"stage2_at": 0.5}}


def _lowrank_for(name: str) -> dict:
    return {"strategy": name, "strategy_args": SAME_TRAINER_ARGS.get(name, {})}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n, cls in REGISTRY.items() if cls.changes_shapes and cls.__module__.startswith("hf_lowrank.")))
def test_resuming_with_the_same_trainer_after_a_rank_change_is_the_uninterrupted_run(name, tmp_path):
    """``t.train()`` changes the layout; ``t.train(resume_from_checkpoint=<earlier>)`` must rebuild the layout,
    the optimizer and the strategy as a fresh process does (it trained stale tensors before)."""
    settings = dict(max_steps=SAME_TRAINER_STEPS, save_steps=SAME_TRAINER_SAVE)
    full = run(tmp_path / "full", lowrank=_lowrank_for(name), **settings)
    at = (max(full["plan_steps"]) - 1) // SAME_TRAINER_SAVE * SAME_TRAINER_SAVE  # the last checkpoint before the last change
    assert at >= SAME_TRAINER_SAVE, f"the layout changes after a checkpoint ({full['plan_steps']})"
    trainer = build_trainer(tmp_path / "same", _lowrank_for(name), **settings)
    trainer.train()
    trainer.train(resume_from_checkpoint=str(tmp_path / "same" / f"checkpoint-{at}"))
    assert_same_run(record(trainer), full, after=at)
    live = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == live, "the optimizer holds the live factors"


def test_a_retry_after_an_interrupted_run_is_the_uninterrupted_run(uninterrupted, tmp_path):
    """Ctrl-C right after InRank's stage-2 truncation (before its checkpoint), then ``train(resume_from_checkpoint=True)``
    on the same trainer: the latest checkpoint is checkpoint-4, from before the truncation."""
    mode, _, full = uninterrupted

    class Interrupt(transformers.TrainerCallback):
        fired = False

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == STAGE2 and not Interrupt.fired:
                Interrupt.fired = True
                raise KeyboardInterrupt

    trainer = build_trainer(tmp_path, VARIANTS[mode])
    trainer.add_callback(Interrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.model.rank_pattern() != LowRankConfig.from_pretrained(tmp_path / "checkpoint-4").rank_pattern
    trainer.train(resume_from_checkpoint=True)  # the latest checkpoint: checkpoint-4
    assert_same_run(record(trainer), full, after=4)
