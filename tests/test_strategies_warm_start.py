"""Kamalakara et al.'s dense warm start: dense for dense_steps, then an SVD split with the lr halved."""

import json

import pytest
import torch
from conftest import build

from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.strategies import TrainContext


def wrap(max_steps: int = 50, bind: bool = True, **kw):
    args = kw.pop("strategy_args", {})
    config = LowRankConfig(
        target_modules=["c_fc", "c_proj"], exclude_modules=r".*attn.*", strategy="warm_start", strategy_args=args, **kw
    )
    model = get_lowrank_model(build("gpt2"), config).eval()
    model.warnings = []
    if bind:
        model.strategy.bind(TrainContext(max_steps=max_steps, warn=model.warnings.append))
    return model


def plans(model, steps):
    """{step: plan} for every step at which the strategy returned a plan."""
    out = {}
    for step in steps:
        if model.strategy.due(step):
            plan = model.strategy.step(step, model.lowrank_layers())
            if plan:
                out[step] = plan
    return out


@pytest.mark.parametrize("dense_steps,switch", [(0.2, 10), (7, 7), (1, 1)])
def test_switches_once_at_exactly_the_configured_step(dense_steps, switch):
    model = wrap(max_steps=50, rank=0.5, mode="factorized", strategy_args={"dense_steps": dense_steps})
    assert all(layer.mode == "dense" for layer in model.lowrank_layers().values()), "starts dense whatever the mode"
    assert not model.strategy.due(switch - 1)
    found = plans(model, range(1, 51))
    assert list(found) == [switch]
    plan = found[switch]
    assert plan.lr_factor == 1.0 and plan.rewarm_steps == 0, "the schedule goes on unchanged by default"
    assert [(c.op, c.rank, c.capacity, c.ones) for c in plan.changes] == [("to_factorized", 16, 16, False)] * 4
    assert model.strategy.is_final()


def test_split_is_the_best_rank_r_approximation():
    model = wrap(rank=4, capacity=8, strategy_args={"dense_steps": 3})
    layers = model.lowrank_layers()
    before = {n: layer.dense_weight() for n, layer in layers.items()}
    model.apply_plan(plans(model, range(1, 10))[3])
    for name, layer in layers.items():
        assert layer.mode == "factorized" and (layer.rank, layer.capacity) == (4, 8)
        u, s, vh = torch.linalg.svd(before[name], full_matrices=False)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        torch.testing.assert_close(layer.dense_weight(), best, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.B[:, :4].norm(dim=0), layer.A[:4].norm(dim=1), msg="balanced split")


def test_spectral_ones():
    model = wrap(rank=4, strategy_args={"dense_steps": 2, "spectral_ones": True})
    plan = plans(model, range(1, 10))[2]
    assert all(c.ones for c in plan.changes)
    model.apply_plan(plan)
    for layer in model.lowrank_layers().values():
        torch.testing.assert_close(layer.singular_values(), torch.ones(4), atol=1e-5, rtol=0)


def test_state_round_trip():
    a, b = wrap(strategy_args={"dense_steps": 5}), wrap(strategy_args={"dense_steps": 5})
    assert plans(a, range(1, 4)) == {}
    b.strategy.load_state_dict(json.loads(json.dumps(a.strategy.state_dict())))
    assert list(plans(a, range(4, 50))) == list(plans(b, range(4, 50))) == [5]
    c = wrap(strategy_args={"dense_steps": 5})
    c.strategy.load_state_dict(json.loads(json.dumps(a.strategy.state_dict())))  # resumed after the switch
    assert c.strategy.is_final() and plans(c, range(1, 50)) == {}


@pytest.mark.parametrize(
    "args,field",
    [
        ({"dense_steps": 0}, "dense_steps"),
        ({"dense_steps": 1.0}, "dense_steps"),
        ({"dense_steps": -3}, "dense_steps"),
        ({"dense_steps": True}, "dense_steps"),
        ({"lr_factor": 0}, "lr_factor"),
        ({"spectral_ones": "yes"}, "spectral_ones"),
        ({"rank": 8}, "rank"),
    ],
)
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ValueError, match=rf"strategy_args.*{field}"):
        LowRankConfig(strategy="warm_start", strategy_args=args)


def test_schedule_point_past_the_end_and_impossible_ranks_fail_early():
    with pytest.raises(ValueError, match=r"strategy_args\.dense_steps=200 is step 200, after the end of training"):
        wrap(max_steps=100, strategy_args={"dense_steps": 200})
    with pytest.raises(ValueError, match=r"LowRankConfig\.rank=64 is larger than"):
        wrap(rank=64, bind=False)  # the tiny model's full rank is 32: refused when wrapping, not at the switch


def test_a_switch_that_leaves_no_phase_warns():
    assert not wrap(max_steps=50, strategy_args={"dense_steps": 0.1}).warnings
    (message,) = wrap(max_steps=50, strategy_args={"dense_steps": 50}).warnings
    assert "the switch (dense_steps=50) is at the last step (50)" in message and "never trained" in message
    model = wrap(max_steps=50, strategy_args={"dense_steps": 0.001})  # rounds to step 0, which never comes
    (message,) = model.warnings
    assert "a single dense step" in message and list(plans(model, range(1, 51))) == [1]
