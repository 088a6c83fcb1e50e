"""Cuttlefish, warm start and dynamic rank adjustment, driven step by step without a Trainer."""

import pytest
import torch
from conftest import build, sample_ids

from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.strategies import TrainContext, strategy_class
from hf_lowrank.strategies.cuttlefish import block_index, converged
from hf_lowrank.strategies.dynamic import COLLAPSE_METRICS


def wrap(strategy: str, max_steps: int = 100, lr_at=lambda s: 1.0, **kw):
    config = LowRankConfig(target_modules=["c_fc", "c_proj"], exclude_modules=r".*attn.*", strategy=strategy, **kw)
    model = get_lowrank_model(build("gpt2"), config).eval()
    warnings = []
    model.strategy.bind(TrainContext(max_steps=max_steps, lr_at=lr_at, warn=warnings.append))
    return model, warnings


def logits(model):
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits


def run_until_plan(model, steps):
    for step in steps:
        if model.strategy.due(step):
            plan = model.strategy.step(step, model.lowrank_layers())
            if plan:
                return step, plan
    return None, None


# -- Cuttlefish -------------------------------------------------------------------------------


def test_detector_on_synthetic_sequences():
    settled = [40, 30, 24, 21] + [20] * 12
    assert not converged(settled[:4], window=5, mean_over=5, tau=100.0), "fewer than window measurements"
    first = next(i for i in range(1, len(settled) + 1) if converged(settled[:i], 5, 5, 0.5))
    assert first == 12  # the EMA lags the settled sequence: mean |g| of the last 5 drops to 0.376 there
    oscillating = [10, 30] * 10
    assert not converged(oscillating, 5, 5, 0.5)
    assert converged(oscillating, 5, 5, 100.0), "relaxing tau enough lets anything pass"


def test_tau_relaxes_as_layers_settle():
    model, _ = wrap("cuttlefish")
    s = model.strategy
    names = [f"l{i}" for i in range(10)]
    s.stable = {n: False for n in names}
    assert s.tau_effective() == s.args.tau
    s.stable = {n: i >= 2 for i, n in enumerate(names)}  # 2 of 10 left: "few"
    assert s.tau_effective() == pytest.approx(s.args.tau * 2.5)
    s.stable = {n: i >= 1 for i, n in enumerate(names)}  # the last one
    assert s.tau_effective() == pytest.approx(s.args.tau * 5.0)


def test_cuttlefish_switches_when_ranks_are_stable_and_keeps_slow_layers_dense(monkeypatch):
    model, _ = wrap("cuttlefish", strategy_args={"measure_every": 2, "window": 3, "mean_over": 3})
    layers = model.lowrank_layers()
    assert all(layer.mode == "dense" for layer in layers.values())
    slow = "transformer.h.1.mlp.c_proj"
    fake = lambda i, o, r, **kw: {"dense_s": 1.0, "factorized_s": 2.0 if o == 32 and i == 128 else 0.5, "speedup": 0.5 if (i, o) == (128, 32) else 2.0}  # noqa: E731
    monkeypatch.setattr("hf_lowrank.strategies.cuttlefish.profile_layer", fake)
    with torch.no_grad():  # "trained" weights: a fast-decaying spectrum, so stable ranks are small
        for layer in layers.values():
            u, _, vh = torch.linalg.svd(layer.weight, full_matrices=False)
            layer.weight.copy_(u @ torch.diag(0.5 ** torch.arange(len(vh), dtype=torch.float32)) @ vh)
    step, plan = run_until_plan(model, range(1, 50))  # weights never change after that: stable at once
    assert step == 6, "three measurements (window) at steps 2, 4, 6"
    factorized = {c.layer for c in plan.changes}
    assert slow not in factorized and "transformer.h.1.mlp.c_fc" in factorized
    assert plan.lr_factor == pytest.approx(1 / 3)
    report = {r["layer"]: r for r in model.strategy.report()}
    assert report[slow]["kept_dense"] and "speedup" in report[slow]["why"]
    for c in plan.changes:  # scaled stable rank: xi * srank(W_t) with W_t = W_0 gives the full rank, capped
        assert 1 <= c.rank <= layers[c.layer].full_rank
    assert model.strategy.is_final() and not model.strategy.due(8)


def test_cuttlefish_switch_keeps_function_at_full_rank():
    model, _ = wrap("cuttlefish", strategy_args={"select_layers": "all"})
    reference = logits(model)
    from hf_lowrank.strategies import LayerChange, Plan

    model.apply_plan(Plan([LayerChange(n, "to_factorized", rank=l.full_rank) for n, l in model.lowrank_layers().items()]))
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)


def test_cuttlefish_keep_first_blocks_and_deadline():
    model, _ = wrap("cuttlefish", max_steps=20, strategy_args={"keep_first_blocks": 1, "select_layers": "all", "measure_every": 100, "max_dense_steps": 0.5})
    step, plan = run_until_plan(model, range(1, 21))
    assert step == 10, "deadline at half of training"
    assert all(block_index(c.layer) == 1 for c in plan.changes)
    assert block_index("transformer.h.3.mlp.c_fc") == 3 and block_index("model.layers.12.mlp") == 12


def test_cuttlefish_state_round_trip():
    a, _ = wrap("cuttlefish", strategy_args={"measure_every": 1, "window": 4, "mean_over": 4, "select_layers": "all"})
    for step in (1, 2):
        a.strategy.step(step, a.lowrank_layers())
    b, _ = wrap("cuttlefish", strategy_args={"measure_every": 1, "window": 4, "mean_over": 4, "select_layers": "all"})
    b.strategy.load_state_dict(a.strategy.state_dict())
    plans = [m.strategy.step(s, m.lowrank_layers()) for m in (a, b) for s in (3, 4)]
    assert plans[0] is None and plans[2] is None
    assert plans[1].to_dict() == plans[3].to_dict()


# -- warm start -------------------------------------------------------------------------------


def test_warm_start_switches_at_the_configured_step():
    model, _ = wrap("warm_start", max_steps=50, rank=0.5, strategy_args={"dense_steps": 0.2})
    step, plan = run_until_plan(model, range(1, 51))
    assert step == 10 and plan.lr_factor == 0.5
    assert {c.op for c in plan.changes} == {"to_factorized"} and {c.rank for c in plan.changes} == {16}
    model.apply_plan(plan)
    assert all(layer.mode == "factorized" and layer.rank == 16 for layer in model.lowrank_layers().values())
    assert model.strategy.is_final()


# -- dynamic ----------------------------------------------------------------------------------


def test_dynamic_schedule_keeps_the_function_across_inflate_and_deflate():
    model, _ = wrap("dynamic", max_steps=100, strategy_args={"inflate_at": 0.3, "deflate_at": 0.6})
    layers = model.lowrank_layers()
    assert all(layer.mode == "factorized" and layer.rank == 16 for layer in layers.values())
    reference = logits(model)
    step, plan = run_until_plan(model, range(1, 101))
    assert step == 30 and {c.op for c in plan.changes} == {"to_dense"}
    model.apply_plan(plan)
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)
    step, plan = run_until_plan(model, range(31, 101))
    assert step == 60 and {c.op for c in plan.changes} == {"to_residual"}
    model.apply_plan(plan)
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)
    layer = next(iter(layers.values()))
    assert layer.mode == "residual" and layer.scaling == pytest.approx(16 / 16) and not layer.base_weight.requires_grad


def test_dynamic_warns_when_the_dense_phase_misses_a_regime():
    decay = lambda s: 1.0 if s < 50 else 0.05  # noqa: E731  high until step 50, then decayed
    _, warnings = wrap("dynamic", lr_at=decay, strategy_args={"inflate_at": 0.6, "deflate_at": 0.9})
    assert len(warnings) == 1 and "high learning rate" in warnings[0]
    _, warnings = wrap("dynamic", lr_at=decay, strategy_args={"inflate_at": 0.1, "deflate_at": 0.4})
    assert len(warnings) == 1 and "post-decay" in warnings[0]
    _, warnings = wrap("dynamic", lr_at=decay, strategy_args={"inflate_at": 0.3, "deflate_at": 0.8})
    assert warnings == []


def test_dynamic_auto_inflate_on_collapse():
    model, _ = wrap("dynamic", max_steps=100, strategy_args={"auto_inflate": True, "check_every": 5, "auto_dense_steps": 10})
    assert run_until_plan(model, range(1, 11)) == (None, None), "random factors have not collapsed"
    with torch.no_grad():
        for layer in model.lowrank_layers().values():
            layer.B[:, 1:] = 0  # rank-1 product: effective rank ratio 1/16
    step, plan = run_until_plan(model, range(11, 101))
    assert step == 15 and {c.op for c in plan.changes} == {"to_dense"}
    assert model.strategy.deflate_step == 25
    assert model.strategy.metric_history[-1][1] < 0.5


def test_collapse_metrics_are_lower_when_collapsed():
    flat, spike = torch.ones(8), torch.tensor([8.0] + [1e-3] * 7)
    for name, metric in COLLAPSE_METRICS.items():
        assert metric(spike, 8) < metric(flat, 8), name


@pytest.mark.parametrize(
    "strategy,args,field",
    [
        ("cuttlefish", {"tau": -1}, "tau"),
        ("cuttlefish", {"select_layers": "some"}, "select_layers"),
        ("warm_start", {"dense_steps": 0}, "dense_steps"),
        ("dynamic", {"inflate_at": 0.8, "deflate_at": 0.5}, "inflate_at"),
        ("dynamic", {"collapse_metric": "nope"}, "collapse_metric"),
        ("inrank", {"threshold": 2.0}, "threshold"),
        ("inrank", {"bogus": 1}, "bogus"),
    ],
)
def test_bad_strategy_args_name_the_field(strategy, args, field):
    with pytest.raises(ValueError, match=field):
        LowRankConfig(strategy=strategy, strategy_args=args)


def test_schedule_point_past_the_end_is_refused():
    with pytest.raises(ValueError, match="stage2_at=500.*after the end"):
        wrap("inrank", max_steps=100, strategy_args={"stage2_at": 500})
    with pytest.raises(ValueError, match="dense_steps=200"):
        wrap("warm_start", max_steps=100, strategy_args={"dense_steps": 200})


def test_every_registered_strategy_loads():
    for name in ("fixed", "inrank", "cuttlefish", "warm_start", "dynamic"):
        assert strategy_class(name).name == name
