"""Cuttlefish: the convergence detector on synthetic sequences, and the switch driven step by step."""

import json
import math

import pytest
import torch
from conftest import build, sample_ids

from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.profiling import profile_layer
from hf_lowrank.spectral import scaled_stable_rank, stable_rank
from hf_lowrank.strategies import TrainContext
from hf_lowrank.strategies.cuttlefish import ConvergenceDetector, block_index, converged

DEIT = dict(window=5, mean_over=5, tau=0.411)


def reference_converged(seq, window, mean_over, tau):
    """ALGORITHMS.md's detector written out by hand: EMA, central differences, one-sided at the ends."""
    if len(seq) < window:
        return False
    a = 2 / (window + 1)
    ema = [seq[0]]
    for x in seq[1:]:
        ema.append(a * x + (1 - a) * ema[-1])
    n = len(ema)
    g = [abs((ema[min(i + 1, n - 1)] - ema[max(i - 1, 0)]) / (min(i + 1, n - 1) - max(i - 1, 0))) for i in range(n)]
    return sum(g[-mean_over:]) / len(g[-mean_over:]) <= tau


# -- the detector -----------------------------------------------------------------------------


def test_converging_sequence_becomes_stable_at_the_right_index():
    settling = [40, 30, 24, 21] + [20] * 20
    verdicts = [converged(settling[:n], **DEIT) for n in range(1, len(settling) + 1)]
    assert verdicts == [reference_converged(settling[:n], **DEIT) for n in range(1, len(settling) + 1)]
    assert verdicts.index(True) + 1 == 12, "the EMA lags the settled sequence; it flattens at the 12th measurement"
    flat = [20] * 10
    assert not converged(flat[:4], **DEIT), "fewer than window measurements"
    assert converged(flat[:5], **DEIT), "a flat sequence is stable as soon as it has window measurements"


def test_oscillating_sequence_never_becomes_stable():
    wave = [20 + 10 * math.sin(2 * math.pi * i / 8) for i in range(200)]
    assert not any(converged(wave[:n], **DEIT) for n in range(1, 201))
    assert converged(wave, window=5, mean_over=5, tau=100.0), "a loose enough tau accepts anything"


def feed(detector, constant: int, slopes: list[float], rounds: int = 40) -> dict[str, int]:
    """Feed ``constant`` flat layers and drifting layers (stable rank 20 + slope * t); round each became stable."""
    when = {}
    for t in range(1, rounds + 1):
        values = {f"flat{i}": 20.0 for i in range(constant)}
        values.update({f"drift{i}": 20.0 + s * t for i, s in enumerate(slopes)})
        for name in detector.update(values):
            when[name] = t
    return when


def test_relaxation_lets_the_last_layers_pass():
    # slope 1.5: above tau (0.411) and tau x 2.5, below tau x 5
    assert feed(ConvergenceDetector(**DEIT), 0, [1.5]) == {}, "alone, a drifting layer never passes tau"
    when = feed(ConvergenceDetector(**DEIT), 3, [1.5])
    assert when == {"flat0": 5, "flat1": 5, "flat2": 5, "drift0": 6}, "one of four left: tau x 5"
    when = feed(ConvergenceDetector(**DEIT), 8, [1.5, 1.5])
    assert "drift0" not in when and "drift1" not in when, "two of ten left: only tau x 2.5"
    # slope 0.8: above tau, below tau x 2.5
    assert feed(ConvergenceDetector(**DEIT), 0, [0.8]) == {}
    when = feed(ConvergenceDetector(**DEIT), 8, [0.8, 0.8])
    assert when["drift0"] == when["drift1"] == 6, "two of ten left (<= 25%): tau x 2.5"


def test_tau_tiers():
    d = ConvergenceDetector(**DEIT, relax_few=2.5, relax_last=5.0, few_fraction=0.25, last_fraction=0.1)
    d.stable = {f"l{i}": False for i in range(20)}
    assert d.tau_effective() == 0.411, "nothing settled yet"
    d.stable = {f"l{i}": i >= 5 for i in range(20)}  # 5 of 20 left: few
    assert d.tau_effective() == pytest.approx(0.411 * 2.5)
    d.stable = {f"l{i}": i >= 2 for i in range(20)}  # 2 of 20 left: at most 10%
    assert d.tau_effective() == pytest.approx(0.411 * 5)
    d.stable = {"only": False}
    assert d.tau_effective() == 0.411, "a single tracked layer is not relaxed"


def test_stability_is_sticky():
    d = ConvergenceDetector(**DEIT)
    verdicts = [d.update({"a": 10.0}) for _ in range(5)]
    assert verdicts == [[], [], [], [], ["a"]] and d.all_stable()
    for t in range(10):  # the curve jumps about afterwards: the layer stays stable, and is not reported again
        assert d.update({"a": 100.0 * (t % 2)}) == []
    assert d.stable == {"a": True} and d.all_stable()
    assert not converged(d.history["a"], **DEIT), "a fresh test on the same history would fail"


def test_block_index():
    assert block_index("transformer.h.3.mlp.c_fc") == 3
    assert block_index("model.layers.12.self_attn.q_proj") == 12
    assert block_index("bert.encoder.layer.0.output.dense") == 0
    assert block_index("lm_head") is None


# -- the switch on a tiny model ---------------------------------------------------------------


def wrap(max_steps: int = 100, **args):
    config = LowRankConfig(target_modules=["c_fc", "c_proj"], exclude_modules=r".*attn.*", strategy="cuttlefish", strategy_args=args)
    model = get_lowrank_model(build("gpt2"), config).eval()
    warnings = []
    model.strategy.bind(TrainContext(max_steps=max_steps, warn=warnings.append))
    return model


def set_spectrum(model, singular_values):
    """Give every layer the spectrum ``singular_values`` (then zeros), keeping its singular vectors."""
    with torch.no_grad():
        for layer in model.lowrank_layers().values():
            u, _, vh = torch.linalg.svd(layer.weight, full_matrices=False)
            s = torch.zeros(len(vh))
            s[: len(singular_values)] = torch.tensor(singular_values)
            layer.weight.copy_(u @ torch.diag(s) @ vh)


def drive(model, steps):
    """Call the strategy as the trainer does; returns (step, plan) of the first non-empty plan."""
    for step in steps:
        if model.strategy.due(step):
            plan = model.strategy.step(step, model.lowrank_layers())
            if plan:
                return step, plan
    return None, None


def logits(model):
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits


def test_switch_after_window_measurements_at_scaled_stable_ranks():
    model = wrap(measure_every=3, select_layers="all")
    layers = model.lowrank_layers()
    assert all(layer.mode == "dense" for layer in layers.values())
    xi = dict(model.strategy.xi)
    for name, layer in layers.items():  # xi = full / srank(W at init), stored when wrapping
        assert xi[name] == pytest.approx(layer.full_rank / stable_rank(layer.singular_values()))
    set_spectrum(model, [4.0, 2.0, 1.0, 1.0, 0.5])  # "trained": srank = floor(22.25 / 16) = 1
    step, plan = drive(model, range(1, 100))
    assert step == 15, "unchanged weights: stable at the 5th (window) measurement, steps 3, 6, ..., 15"
    expected = {n: scaled_stable_rank(l.singular_values(), xi[n], l.full_rank) for n, l in layers.items()}
    assert {c.layer: c.rank for c in plan.changes} == expected
    assert all(c.op == "to_factorized" and c.capacity == c.rank for c in plan.changes)
    assert all(r == min(32, math.ceil(xi[n] * 1)) for n, r in expected.items())
    assert plan.lr_factor == pytest.approx(1 / 3) and plan.rewarm_steps == 0, "DeiT's factorized_lr_decay"
    assert model.strategy.is_final() and not model.strategy.due(18)
    model.apply_plan(plan)
    assert {n: l.rank for n, l in layers.items()} == expected


def test_floor_and_rewarm():
    model = wrap(measure_every=1, select_layers="all", floor_fraction=0.5, rewarm_steps=7)
    set_spectrum(model, [1.0])
    step, plan = drive(model, range(1, 100))
    assert {c.rank for c in plan.changes} == {16}, "floor: half of full rank 32"
    assert plan.lr_factor == 1.0 and plan.rewarm_steps == 7


def test_switch_keeps_the_function_when_the_rank_covers_the_weight():
    model = wrap(measure_every=1, select_layers="all")
    set_spectrum(model, [1.0, 1.0])  # exact rank 2, stable rank 2
    reference = logits(model)
    step, plan = drive(model, range(1, 100))
    assert step == 5 and len(plan.changes) == 4 and all(c.rank >= 2 for c in plan.changes)
    model.apply_plan(plan)
    assert all(layer.mode == "factorized" for layer in model.lowrank_layers().values())
    torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)


def test_measured_selection_keeps_slow_layers_and_first_blocks_dense(monkeypatch):
    calls = []

    def fake_profile(in_features, out_features, rank, tokens, device, dtype, repeats):
        calls.append((in_features, out_features, rank))
        slow = (in_features, out_features) == (128, 32)  # the c_proj shape does not get faster
        return {"dense_s": 1.0, "factorized_s": 2.0 if slow else 0.5}

    monkeypatch.setattr("hf_lowrank.strategies.cuttlefish.profile_layer", fake_profile)
    model = wrap(measure_every=1)
    set_spectrum(model, [1.0])
    step, plan = drive(model, range(1, 100))
    assert {c.layer for c in plan.changes} == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    assert len(calls) == len(set(calls)), "each distinct (in, out, rank) is profiled once"
    report = {row["layer"]: row for row in model.strategy.report()}
    slow = report["transformer.h.1.mlp.c_proj"]
    assert slow["kept_dense"] and slow["dense_s"] == 1.0 and slow["factorized_s"] == 2.0 and "0.50x" in slow["why"]
    assert not report["transformer.h.1.mlp.c_fc"]["kept_dense"]

    model = wrap(measure_every=1, keep_first_blocks=1)
    set_spectrum(model, [1.0])
    step, plan = drive(model, range(1, 100))
    assert {c.layer for c in plan.changes} == {"transformer.h.1.mlp.c_fc"}
    assert "keep_first_blocks" in {r["layer"]: r for r in model.strategy.report()}["transformer.h.0.mlp.c_fc"]["why"]


def test_layers_that_would_not_shrink_stay_dense():
    model = wrap(measure_every=1, select_layers="all")  # unchanged random weights: xi * srank = full rank
    assert drive(model, range(1, 100)) == (None, None), "an empty plan: no layer changes, the learning rate neither"
    assert model.strategy.is_final() and len(model.strategy.report()) == 4
    assert all(row["kept_dense"] and "not be smaller" in row["why"] for row in model.strategy.report())


def test_deadline():
    model = wrap(max_steps=20, measure_every=100, max_dense_steps=0.5, select_layers="all")
    set_spectrum(model, [1.0])
    step, plan = drive(model, range(1, 21))
    assert step == 10 and "deadline" in plan.reason and len(plan.changes) == 4
    model = wrap(max_steps=20, measure_every=100, max_dense_steps=None)
    assert drive(model, range(1, 21)) == (None, None)
    with pytest.raises(ValueError, match=r"strategy_args\.max_dense_steps=500 is step 500, after the end"):
        wrap(max_steps=100, max_dense_steps=500)


def test_state_round_trip_continues_identically():
    def fresh():
        model = wrap(measure_every=1, window=6, mean_over=4, select_layers="all")
        set_spectrum(model, [3.0, 1.0, 1.0])
        return model

    a = fresh()
    b = fresh()
    b.strategy.xi = {}  # b's own init measurement must not matter: the state carries xi
    for step in range(1, 4):
        assert a.strategy.step(step, a.lowrank_layers()) is None
    state = json.loads(json.dumps(a.strategy.state_dict()))
    b.strategy.load_state_dict(state)
    assert b.strategy.state_dict() == state
    (step_a, plan_a), (step_b, plan_b) = drive(a, range(4, 50)), drive(b, range(4, 50))
    assert step_a == step_b == 6 and plan_a.to_dict() == plan_b.to_dict()
    assert a.strategy.report() == b.strategy.report()


@pytest.mark.parametrize(
    "args,field",
    [
        ({"tau": -1}, "tau"),
        ({"window": 0}, "window"),
        ({"measure_every": 2.5}, "measure_every"),
        ({"relax_few": 0.5}, "relax_few"),
        ({"few_fraction": 1.5}, "few_fraction"),
        ({"floor_fraction": -0.1}, "floor_fraction"),
        ({"max_dense_steps": 0}, "max_dense_steps"),
        ({"factorized_lr_decay": 0}, "factorized_lr_decay"),
        ({"select_layers": "some"}, "select_layers"),
        ({"min_speedup": "fast"}, "min_speedup"),
        ({"keep_first_blocks": -1}, "keep_first_blocks"),
        ({"tua": 0.4}, "tua"),
    ],
)
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ValueError, match=rf"strategy_args.*{field}"):
        LowRankConfig(strategy="cuttlefish", strategy_args=args)


# -- profiling --------------------------------------------------------------------------------


def test_profile_layer_measures_without_touching_the_training_rng():
    rng = torch.get_rng_state()
    with torch.no_grad():  # the trainer may decide under no_grad; profiling still needs a backward
        t = profile_layer(64, 256, 8, tokens=256, device="cpu", dtype=torch.float32, repeats=3)
    assert set(t) == {"dense_s", "factorized_s"} and all(v > 0 for v in t.values())
    assert torch.equal(torch.get_rng_state(), rng)
