"""LowRankTrainer with InRank: growth, stage 2, optimizer consistency, learning-rate changes.

The runs are tests/helpers_train.py's ``build_trainer(..., wide=True)``: wide_gpt2() on wide_tokens().
"""

import math
import os

import pytest
import torch
import transformers
from helpers_train import build_trainer, wide_gpt2, wide_tokens

from hf_lowrank import LowRankConfig, get_lowrank_model, optim
from hf_lowrank.spectral import explained_ratio
from hf_lowrank.strategies import LayerChange, Plan, TrainContext
from hf_lowrank.strategies.inrank import InRank


def check_optimizer_matches_model(trainer):
    opt = optim.inner_optimizer(trainer.optimizer)
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(in_groups) == len({id(p) for p in in_groups}), "a parameter sits in two groups"
    assert {id(p) for p in in_groups} == {id(p) for p in trainable}
    assert all(id(p) in {id(q) for q in in_groups} for p in opt.state)


def test_inrank_grows_then_freezes(tmp_path):
    trainer = build_trainer(tmp_path / "run", wide=True)
    start = {n: layer.rank for n, layer in trainer.model.lowrank_layers().items()}
    trainer.train()
    reasons = [h["reason"] for h in trainer.plan_history]
    assert any("growth" in r for r in reasons)
    assert "stage 2" in reasons[-1] and trainer.plan_history[-1]["step"] == 12
    found = trainer.strategy.ranks
    for name, layer in trainer.model.lowrank_layers().items():
        assert layer.rank == layer.capacity == found[name], "stage 2 drops the buffer"
        assert found[name] > 2, "ranks grew from initial_rank=2"
        assert layer.rank < start[name]
    check_optimizer_matches_model(trainer)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(e["loss"]) for e in logged)
    assert all("lowrank/rank_fraction" in e and "lowrank/trainable_params" in e for e in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_growth_rule_matches_explained_ratio():
    """The new rank is the first k whose explained ratio exceeds the threshold; never shrinks."""
    lm = get_lowrank_model(
        wide_gpt2(),
        LowRankConfig(target_modules=["c_fc"], strategy="inrank", strategy_args={"buffer": 8, "warmup_steps": 0, "interval": 1, "stage2_at": None}, capacity=32),
    )
    strategy: InRank = lm.strategy
    strategy.bind(TrainContext(max_steps=100))
    name, layer = next(iter(lm.lowrank_layers().items()))
    assert (layer.rank, layer.capacity) == (10, 32)
    with torch.no_grad():  # active product B A with a known spectrum: 5 large, the rest small
        u, _ = torch.linalg.qr(torch.randn(layer.out_features, 10))
        v, _ = torch.linalg.qr(torch.randn(layer.in_features, 10))
        s = torch.tensor([10.0, 9, 8, 7, 6, 0.5, 0.4, 0.3, 0.2, 0.1])
        layer.B[:, :10] = u * s.sqrt()
        layer.A[:10] = (v * s.sqrt()).T
    expected = next(k for k in range(2, 10) if explained_ratio(s, k, length=layer.full_rank) > 0.9)
    plan = strategy.step(1, {name: layer})
    assert plan.changes == [LayerChange(name, "grow", rank=expected + 8)]
    assert strategy.ranks[name] == expected
    lm.apply_plan(plan)
    with torch.no_grad():
        layer.B.zero_()  # a collapsed spectrum must not shrink the rank
    assert strategy.step(2, {name: layer}) is None and strategy.ranks[name] == expected


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    trainer = build_trainer(tmp_path / "run", wide=True, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer.train()
    assert trainer.plan_history[-1]["step"] == 12  # stage 2 at half of 24 optimizer steps
    check_optimizer_matches_model(trainer)


def test_frobenius_decay_gradient(tmp_path):
    lam = 0.01
    trainer = build_trainer(tmp_path / "run", {"strategy": "fixed", "strategy_args": {}, "rank": 8, "frobenius_decay": lam, "precondition": False}, wide=True)
    trainer.create_optimizer()
    trainer.model.bind_training(10, trainer.optimizer)
    layer = next(iter(trainer.model.lowrank_layers().values()))
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    assert not any(n.endswith((".A", ".B")) for n in decay), "factors leave plain weight decay"
    B = layer.B.detach().clone().requires_grad_(True)
    A = layer.A.detach().clone().requires_grad_(True)
    (lam / 2 * (B @ A).pow(2).sum()).backward()
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    for hook in optim.inner_optimizer(trainer.optimizer)._optimizer_step_pre_hooks.values():
        hook(trainer.optimizer, (), {})  # the non-finite guard (nothing to do here) and the decay
    torch.testing.assert_close(layer.B.grad, B.grad)
    torch.testing.assert_close(layer.A.grad, A.grad)


def test_plan_regroups_optimizer_and_scales_lr(tmp_path):
    trainer = build_trainer(tmp_path / "run", {"strategy": "fixed", "strategy_args": {}, "mode": "dense"}, wide=True, max_steps=2)
    trainer.train()
    opt = optim.inner_optimizer(trainer.optimizer)
    kept = trainer.model.base_model.transformer.wte.weight
    kept_state = opt.state[kept]["exp_avg"].clone()
    lr_before = [g["lr"] for g in opt.param_groups]
    name = next(iter(trainer.model.lowrank_layers()))
    trainer.apply_plan(Plan([LayerChange(name, "to_factorized", rank=16)], lr_factor=0.5), step=2)
    check_optimizer_matches_model(trainer)
    layer = trainer.model.lowrank_layers()[name]
    assert layer.A not in opt.state and layer.B not in opt.state, "new factors start with fresh state"
    torch.testing.assert_close(opt.state[kept]["exp_avg"], kept_state)
    assert [g["lr"] for g in opt.param_groups] == [lr / 2 for lr in lr_before]
    sched = optim.inner_scheduler(trainer.lr_scheduler)
    assert sched.base_lrs == [3e-3 / 2] * len(sched.base_lrs)
    assert trainer.model.lr_adjust.factor == 0.5


def test_rewarm_ramps_learning_rate(tmp_path):
    trainer = build_trainer(tmp_path / "run", {"strategy": "fixed", "strategy_args": {}}, wide=True, max_steps=2, lr_scheduler_type="constant")
    trainer.train()
    trainer.apply_plan(Plan(rewarm_steps=4), step=2)
    lrs = []
    for step in range(2, 8):
        for g in optim.inner_optimizer(trainer.optimizer).param_groups:
            g["lr"] = 3e-3  # what a constant schedule sets before on_step_end
        trainer.model.lr_adjust.apply_rewarm(trainer.optimizer, step)
        lrs.append(optim.inner_optimizer(trainer.optimizer).param_groups[0]["lr"])
    assert lrs == pytest.approx([3e-3 * k / 5 for k in (1, 2, 3, 4)] + [3e-3, 3e-3])


def test_finetune_pretrained_residual(tmp_path):
    """Residual InRank over frozen pretrained weights, from AutoModelForCausalLM.from_pretrained."""
    wide_gpt2().save_pretrained(tmp_path / "pretrained")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained").eval()
    x = wide_tokens(2).x
    reference = base(x).logits
    pretrained_fc = base.transformer.h[0].mlp.c_fc.weight.detach().T.clone()
    trainer = build_trainer(tmp_path / "run", {"mode": "residual"}, base, wide=True, max_steps=12)
    wrapped = trainer.model.eval()
    torch.testing.assert_close(wrapped(x).logits, reference)
    trainer.train()
    layer = trainer.model.lowrank_layers()["transformer.h.0.mlp.c_fc"]
    assert layer.mode == "residual"
    torch.testing.assert_close(layer.base_weight, pretrained_fc)
    assert not layer.base_weight.requires_grad and layer.B.abs().sum() > 0
    check_optimizer_matches_model(trainer)


def test_rank_curves_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = build_trainer(tmp_path / "run", wide=True, report_to=["tensorboard"], logging_steps=2)
    trainer.train()
    runs = [root for root, _, files in os.walk(tmp_path / "run") if any("tfevents" in f for f in files)]
    events = EventAccumulator(runs[0])
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/lowrank/rank_fraction" in tags
    curve = [e.value for e in events.Scalars("train/lowrank/rank/transformer.h.0.mlp.c_fc")]
    assert len(curve) >= 5 and len(set(curve)) > 1, "the rank curve moves"
