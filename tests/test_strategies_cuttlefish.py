"""Cuttlefish: the convergence detector on synthetic sequences, and the switch driven step by step."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import build, sample_ids

from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.profiling import profile_layer
from hf_lowrank.spectral import scaled_stable_rank, stable_rank
from hf_lowrank.strategies import TrainContext
from hf_lowrank.strategies.cuttlefish import ConvergenceDetector, block_index, converged

DEIT = dict(window=5, mean_over=5, tau=0.411)


def authors_detector(epoch, layer_est_ranks, num_layers_remain, window=5, mean_over=5, tau=0.411, few=range(5, 10), last=range(5)):
    """The authors' DeiT ``layer_rank_stable_detector`` re-derived from its description with numpy:
    thresholds by absolute counts of unstable layers, no verdict while ``epoch < window``
    (epochs from 0), EMA ``2 / (window + 1)``, mean |numpy.gradient| of the last ``mean_over``."""
    threshold = tau * 2.5 if num_layers_remain in few else tau * 5 if num_layers_remain in last else tau
    if epoch < window:
        return False
    a = 2 / (window + 1)
    ema = np.zeros(len(layer_est_ranks))
    ema[0] = layer_est_ranks[0]
    for i in range(1, len(layer_est_ranks)):
        ema[i] = layer_est_ranks[i] * a + ema[i - 1] * (1 - a)
    return np.mean(np.abs(np.gradient(ema))[-mean_over:]) <= threshold


def authors_rounds(init: dict, rounds: list[dict], **kw) -> dict:
    """The authors' loop: the history starts at init (epoch -1), one round per epoch, sticky stability,
    ``num_layers_remain`` counted before each round. Returns {layer: epoch it became stable}."""
    history = {n: [v] for n, v in init.items()}
    stable, when = {n: False for n in init}, {}
    for epoch, values in enumerate(rounds):
        remain = sum(not s for s in stable.values())
        for name, value in values.items():
            history[name].append(value)
            if not stable[name] and authors_detector(epoch, history[name], remain, **kw):
                stable[name], when[name] = True, epoch
    return when


def ours_rounds(init: dict, rounds: list[dict], **kw) -> dict:
    d = ConvergenceDetector(**DEIT, **kw)
    for name, value in init.items():
        d.start(name, value)
    when = {}
    for epoch, values in enumerate(rounds):
        for name in d.update(values):
            when[name] = epoch
    return when


# -- the detector -----------------------------------------------------------------------------


def test_converging_sequence_becomes_stable_where_the_authors_detector_does():
    settling = [40, 30, 24, 21] + [20] * 20
    verdicts = [converged([48] + settling[:n], **DEIT, initial=True) for n in range(1, len(settling) + 1)]
    expected = [authors_detector(n - 1, [48] + settling[:n], 20) for n in range(1, len(settling) + 1)]
    assert verdicts == expected and True in verdicts
    flat = [20] * 10
    assert not converged(flat[:5], **DEIT), "window measurements are one too few: the authors test epoch < window"
    assert converged(flat[:6], **DEIT), "a flat sequence is stable at window + 1 measurements"
    assert not converged(flat[:6], **DEIT, initial=True), "the init value is not a measurement"
    assert converged(flat[:7], **DEIT, initial=True)


def test_oscillating_sequence_never_becomes_stable():
    wave = [20 + 10 * math.sin(2 * math.pi * i / 8) for i in range(200)]
    assert not any(converged(wave[:n], **DEIT) for n in range(1, 201))
    assert converged(wave, window=5, mean_over=5, tau=100.0), "a loose enough tau accepts anything"


@pytest.mark.parametrize("flat, drifting", [(0, 1), (3, 1), (2, 3), (8, 2), (12, 2), (20, 6), (40, 12)])
@pytest.mark.parametrize("slope", [0.3, 0.8, 1.5, 3.0])
def test_detector_matches_the_authors_loop(flat, drifting, slope):
    """Whole runs (flat and drifting layers) give the same stability epochs as the authors' DeiT loop."""
    init = {f"flat{i}": 20.0 for i in range(flat)} | {f"drift{i}": 20.0 for i in range(drifting)}
    rounds = [
        {f"flat{i}": 20.0 for i in range(flat)} | {f"drift{i}": 20.0 + slope * (t + 1) * (i + 1) for i in range(drifting)}
        for t in range(40)
    ]
    assert ours_rounds(init, rounds) == authors_rounds(init, rounds)


def test_tau_tiers_count_unstable_layers():
    d = ConvergenceDetector(**DEIT)  # the authors' DeiT counts: x2.5 at 5-9 unstable, x5 at 0-4
    for left, factor in [(48, 1.0), (10, 1.0), (9, 2.5), (5, 2.5), (4, 5.0), (1, 5.0)]:
        d.stable = {f"l{i}": i >= left for i in range(48)}
        assert d.tau_effective() == pytest.approx(0.411 * factor), left
    cifar = ConvergenceDetector(window=15, mean_over=11, tau=0.1, few_layers=2, last_layers=1)
    for left, factor in [(3, 1.0), (2, 2.5), (1, 5.0)]:
        cifar.stable = {f"l{i}": i >= left for i in range(20)}
        assert cifar.tau_effective() == pytest.approx(0.1 * factor), left


def test_stability_is_sticky():
    d = ConvergenceDetector(**DEIT, few_layers=0, last_layers=0)
    verdicts = [d.update({"a": 10.0}) for _ in range(6)]
    assert verdicts == [[], [], [], [], [], ["a"]] and d.all_stable()
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
    model.warnings = []
    model.strategy.bind(TrainContext(max_steps=max_steps, warn=model.warnings.append))
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
    assert step == 18, "stable at the 6th (window + 1) measurement, steps 3, 6, ..., 18"
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
    assert step == 6 and len(plan.changes) == 4 and all(c.rank >= 2 for c in plan.changes)
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
    assert len(model.warnings) == 1 and "the switch will come at the deadline" in model.warnings[0]
    set_spectrum(model, [1.0])
    step, plan = drive(model, range(1, 21))
    assert step == 10 and "deadline" in plan.reason and len(plan.changes) == 4
    with pytest.raises(ValueError, match=r"strategy_args\.measure_every=100 .* 0 stable-rank measurement.* give measure_every <= 3"):
        wrap(max_steps=20, measure_every=100, max_dense_steps=None)
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
    assert step_a == step_b == 7 and plan_a.to_dict() == plan_b.to_dict()
    assert a.strategy.report() == b.strategy.report()


@pytest.mark.parametrize(
    "args,field",
    [
        ({"tau": -1}, "tau"),
        ({"window": 0}, "window"),
        ({"measure_every": 2.5}, "measure_every"),
        ({"relax_few": 0.5}, "relax_few"),
        ({"few_layers": 1.5}, "few_layers"),
        ({"few_layers": 2, "last_layers": 3}, "last_layers"),
        ({"history_from_init": "yes"}, "history_from_init"),
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


def test_init_is_the_first_point_of_each_history():
    model = wrap(measure_every=1, select_layers="all")
    d = model.strategy.detector
    for name, layer in model.lowrank_layers().items():
        assert d.history[name] == [stable_rank(layer.singular_values())] and name in d.initial
    cifar = wrap(measure_every=1, select_layers="all", history_from_init=False)
    assert cifar.strategy.detector.history == {}


def test_a_deadline_at_the_last_step_warns():
    model = wrap(max_steps=60, measure_every=1, max_dense_steps=60)
    assert any("never trained" in w for w in model.warnings)
    assert not wrap(max_steps=60, measure_every=1).warnings, "the defaults act in a 60-step run"
