"""Dynamic rank adjustment: factorized -> inflate to dense -> deflate to frozen base + adapter."""

import json
import math

import pytest
import torch
from conftest import build, sample_ids

from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.strategies import TrainContext
from hf_lowrank.strategies.dynamic import COLLAPSE_METRICS, CollapseMetric


def wrap(max_steps: int = 100, lr_at=lambda i: 1.0, **args):
    config = LowRankConfig(target_modules=["c_fc", "c_proj"], exclude_modules=r".*attn.*", strategy="dynamic", strategy_args=args)
    model = get_lowrank_model(build("gpt2"), config).eval()
    warnings = []
    model.strategy.bind(TrainContext(max_steps=max_steps, lr_at=lr_at, warn=warnings.append))
    return model, warnings


def drive(model, steps, apply=True):
    """{step: plan} for the steps that returned a plan, applying each as the trainer would."""
    out = {}
    for step in steps:
        if model.strategy.due(step):
            plan = model.strategy.step(step, model.lowrank_layers())
            if plan:
                out[step] = plan
                if apply:
                    model.apply_plan(plan)
    return out


def logits(model):
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits


def collapse_to_rank_one(model):
    with torch.no_grad():
        for layer in model.lowrank_layers().values():
            layer.B[:, 1:] = 0  # B A has rank one


def cosine(max_steps, warmup=0):
    return lambda i: (i / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / (max_steps - warmup))))


# -- the fixed schedule -----------------------------------------------------------------------


def test_inflate_and_deflate_at_the_scheduled_steps_keep_the_function():
    model, _ = wrap(max_steps=100, lr_at=cosine(100), inflate_at=0.3, deflate_at=60)
    layers = model.lowrank_layers()
    assert {(layer.mode, layer.rank, layer.capacity) for layer in layers.values()} == {("factorized", 16, 16)}
    reference = logits(model)

    inflate = drive(model, range(1, 60))
    assert list(inflate) == [30] and {c.op for c in inflate[30].changes} == {"to_dense"}
    assert inflate[30].lr_factor == 1.0 and inflate[30].rewarm_steps == 0
    assert all(layer.mode == "dense" and layer.weight.requires_grad for layer in layers.values())
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)

    deflate = drive(model, range(60, 101))
    assert list(deflate) == [60]
    assert [(c.op, c.rank, c.alpha) for c in deflate[60].changes] == [("to_residual", 16, 16.0)] * 4
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)
    for layer in layers.values():
        assert layer.mode == "residual" and layer.scaling == pytest.approx(16 / 16)
        assert not layer.base_weight.requires_grad and not layer.bias.requires_grad and layer.B.abs().max() == 0
    assert model.strategy.is_final() and not model.strategy.due(61)


def test_rank_and_adapter_rank():
    model, _ = wrap(max_steps=10, rank=8, adapter_rank=0.25, alpha=4.0, inflate_at=2, deflate_at=4)
    assert {layer.rank for layer in model.lowrank_layers().values()} == {8}
    drive(model, range(1, 11))
    assert {(layer.rank, layer.scaling) for layer in model.lowrank_layers().values()} == {(8, 0.5)}, "0.25 x 32, alpha / r"


# -- the schedule check -----------------------------------------------------------------------


def test_schedule_warnings():
    step_decay = lambda i: 1.0 if i < 50 else 0.05  # noqa: E731  high until step 50, then decayed 20x
    _, warnings = wrap(lr_at=step_decay, inflate_at=0.6, deflate_at=0.9)
    assert len(warnings) == 1 and "never sees a high learning rate" in warnings[0] and "inflate_at" in warnings[0]
    _, warnings = wrap(lr_at=step_decay, inflate_at=0.1, deflate_at=0.4)
    assert len(warnings) == 1 and "post-decay" in warnings[0] and "deflate_at" in warnings[0]
    _, warnings = wrap(lr_at=step_decay, inflate_at=0.3, deflate_at=0.8)
    assert warnings == []
    _, warnings = wrap(lr_at=lambda i: 1.0)
    assert len(warnings) == 1 and "post-decay" in warnings[0], "a constant rate never decays"
    _, warnings = wrap(lr_at=lambda i: 1.0, check_schedule=False)
    assert warnings == []


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_default_schedule_fits_the_usual_decays(schedule):
    warmup = 20
    lr = cosine(300, warmup) if schedule == "cosine" else (lambda i: i / warmup if i < warmup else (300 - i) / (300 - warmup))
    _, warnings = wrap(max_steps=300, lr_at=lr)
    assert warnings == []


# -- automatic inflate ------------------------------------------------------------------------


@pytest.mark.parametrize("metric", sorted(COLLAPSE_METRICS))
def test_auto_inflate_when_the_factors_collapse(metric):
    model, warnings = wrap(max_steps=100, auto_inflate=True, collapse_metric=metric, check_every=5, dense_steps_after_auto=10)
    assert warnings == [], "no schedule to check"
    assert drive(model, range(1, 21)) == {}, "random factors have not collapsed"
    assert [s for s, _ in model.strategy.metric_history] == [5, 10, 15, 20]
    collapse_to_rank_one(model)
    reference = logits(model)
    found = drive(model, range(21, 101))
    assert list(found) == [25, 35], "inflate at the next check, deflate dense_steps_after_auto later"
    assert {c.op for c in found[25].changes} == {"to_dense"} and metric in found[25].reason
    assert {c.op for c in found[35].changes} == {"to_residual"}
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)
    history = model.strategy.metric_history
    assert len(history) == 5 and COLLAPSE_METRICS[metric].collapsed(history[-1][1], COLLAPSE_METRICS[metric].default_threshold)
    json.dumps(model.strategy.state_dict(), allow_nan=False)


def test_auto_deflate_is_clipped_to_the_end_and_threshold_is_configurable():
    model, _ = wrap(max_steps=30, auto_inflate=True, check_every=5, dense_steps_after_auto=0.9)
    collapse_to_rank_one(model)
    assert list(drive(model, range(1, 31))) == [5, 30]
    model, _ = wrap(max_steps=30, auto_inflate=True, check_every=5, collapse_threshold=0.99)
    assert list(drive(model, range(1, 11), apply=False)) == [5], "random factors are below an effective-rank ratio of 0.99"


def test_collapse_metrics_are_pluggable(monkeypatch):
    monkeypatch.setitem(COLLAPSE_METRICS, "top_share", CollapseMetric(lambda s, layer: float(s[0] / s.sum()), "above", 0.8))
    model, _ = wrap(max_steps=100, auto_inflate=True, collapse_metric="top_share", check_every=4)
    assert drive(model, range(1, 9)) == {}
    collapse_to_rank_one(model)
    assert list(drive(model, range(9, 13))) == [12]


# -- state and validation ---------------------------------------------------------------------


@pytest.mark.parametrize("auto", [False, True])
def test_state_round_trip_continues_identically(auto):
    args = {"auto_inflate": True, "check_every": 3, "dense_steps_after_auto": 7} if auto else {"inflate_at": 10, "deflate_at": 20}
    a, _ = wrap(max_steps=40, **args)
    b, _ = wrap(max_steps=40, **args)
    b.load_state_dict(a.state_dict())  # same weights, as a checkpoint would restore them
    collapse_to_rank_one(a)
    collapse_to_rank_one(b)
    split = 6 if auto else 13  # resume inside the dense phase
    assert list(drive(a, range(1, split))) == ([3] if auto else [10])
    b.apply_rank_pattern(a.rank_pattern())  # a checkpoint rebuilds the shapes, then loads tensors and state
    b.load_state_dict(a.state_dict())
    b.strategy.load_state_dict(json.loads(json.dumps(a.strategy.state_dict())))
    rest_a, rest_b = drive(a, range(split, 41)), drive(b, range(split, 41))
    assert list(rest_a) == list(rest_b) == ([10] if auto else [20])
    assert [p.to_dict() for p in rest_a.values()] == [p.to_dict() for p in rest_b.values()]
    assert a.strategy.state_dict() == b.strategy.state_dict()
    torch.testing.assert_close(logits(a), logits(b))


@pytest.mark.parametrize(
    "args,field",
    [
        ({"inflate_at": 0.8, "deflate_at": 0.5}, "inflate_at"),
        ({"inflate_at": 0}, "inflate_at"),
        ({"deflate_at": 1.5}, "deflate_at"),
        ({"rank": 0}, "rank"),
        ({"adapter_rank": 1.5}, "adapter_rank"),
        ({"alpha": -1}, "alpha"),
        ({"high_lr_fraction": 2}, "high_lr_fraction"),
        ({"collapse_metric": "nope"}, "collapse_metric"),
        ({"collapse_threshold": -1.0}, "collapse_threshold"),
        ({"check_every": 0}, "check_every"),
        ({"auto_inflate": "yes"}, "auto_inflate"),
        ({"dense_steps_after_auto": 0}, "dense_steps_after_auto"),
    ],
)
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ValueError, match=rf"strategy_args.*{field}"):
        LowRankConfig(strategy="dynamic", strategy_args=args)


def test_schedule_errors_when_training_starts():
    with pytest.raises(ValueError, match=r"strategy_args\.deflate_at=500 is step 500, after the end"):
        wrap(max_steps=100, deflate_at=500)
    with pytest.raises(ValueError, match=r"inflate_at=0\.5 \(step 50\) is not before deflate_at=40"):
        wrap(max_steps=100, inflate_at=0.5, deflate_at=40)
    with pytest.raises(ValueError, match=r"strategy_args\.dense_steps_after_auto=200"):
        wrap(max_steps=100, auto_inflate=True, dense_steps_after_auto=200)
    with pytest.raises(ValueError, match=r"strategy_args\.rank=64 is larger than"):
        wrap(rank=64)


@pytest.mark.parametrize("mode", ["dense", "residual"])
def test_a_mode_other_than_factorized_is_refused(mode):
    with pytest.raises(ValueError, match=rf"LowRankConfig\.mode='{mode}' is not allowed; strategy 'dynamic' starts factorized"):
        LowRankConfig(target_modules=["c_fc"], mode=mode, strategy="dynamic")  # refused with the config, before any model


def test_a_collapse_check_after_the_end_is_refused_and_a_single_one_warns():
    with pytest.raises(ValueError, match=r"strategy_args\.check_every=500 is not allowed; .* never inflate; give check_every <= 20"):
        wrap(max_steps=20, auto_inflate=True, check_every=500)
    _, warnings = wrap(max_steps=30, auto_inflate=True, check_every=20)
    assert len(warnings) == 1 and "only 1 collapse check" in warnings[0]
    _, warnings = wrap(max_steps=100, auto_inflate=True, check_every=25)
    assert warnings == []


def test_a_deflate_at_the_last_step_warns():
    _, warnings = wrap(max_steps=100, inflate_at=0.3, deflate_at=100, check_schedule=False)
    assert len(warnings) == 1 and "the adapter phase never trains" in warnings[0]
