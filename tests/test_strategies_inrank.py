"""InRank: sizes floored as the authors' are, the rank test over the whole spectrum, schedules that
scale with the run and refuse to idle, the authors' preset, and both layouts of inactive components."""

import math
from fractions import Fraction

import pytest
import torch
from conftest import build, sample_ids
from torch import nn

from hf_lowrank import LowRankConfig, LowRankLinear, get_lowrank_model
from hf_lowrank.spectral import first_rank_above
from hf_lowrank.strategies import TrainContext
from hf_lowrank.strategies.inrank import MIN_CHECKS, PRESETS, InRank, InRankArgs


def strategy(max_steps: int | None = None, warn=None, **args) -> InRank:
    s = InRank(LowRankConfig(target_modules=["x"], strategy="inrank", strategy_args=args))
    if max_steps is not None:
        s.bind(TrainContext(max_steps=max_steps, warn=warn if warn is not None else (lambda m: None)))
    return s


def growth_steps(s: InRank, max_steps: int) -> list[int]:
    """The steps with a growth check before stage 2 (after it the strategy is frozen)."""
    end = max_steps + 1 if s.stage2_step is None else s.stage2_step
    return [t for t in range(1, end) if s.due(t)]


# -- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_f, out_f", [(67, 131), (131, 67), (65, 65), (33, 200), (201, 200)])
@pytest.mark.parametrize("buffer", [0.25, 0.29, 0.1, 7])
def test_capacity_and_buffer_are_floored_for_odd_sizes(in_f, out_f, buffer):
    s = strategy(buffer=buffer)
    layer = LowRankLinear(nn.Linear(in_f, out_f))
    spec = s.initial_spec("x", layer)
    capacity = min(in_f, out_f) // 2  # the authors' int(min(in, out) / 2)
    # the exact product of the decimal fraction, floored (0.29 * 100 is 29, not 28.999...)
    expected_buffer = math.floor(Fraction(str(buffer)) * capacity) if isinstance(buffer, float) else buffer
    assert spec.capacity == capacity and s.buffers["x"] == min(expected_buffer, capacity - 1)
    assert spec.rank == s.ranks["x"] + s.buffers["x"]


def test_an_initial_rank_that_does_not_fit_warns_with_the_layer_and_the_cap():
    s = strategy(initial_rank=1000, buffer=8)
    layer = LowRankLinear(nn.Linear(64, 64))  # capacity 32, buffer 8: r0 at most 24
    with pytest.warns(UserWarning, match=r"initial_rank=1000 does not fit layer 'x' \(capacity 32 - buffer 8 = 24\)"):
        spec = s.initial_spec("x", layer)
    assert s.ranks["x"] == 24 and spec.rank == 32


# -- the rank test ------------------------------------------------------------------------------


def test_growth_check_takes_the_ratio_over_min_in_out_values():
    """The strategy pads the active spectrum to the layer's full rank, as the authors' SVD of B A has."""
    s = strategy(max_steps=100, buffer=40, warmup_steps=0, interval=1, stage2_at=None)
    layer = LowRankLinear(nn.Linear(256, 256))
    spec = s.initial_spec("x", layer)
    layer.init_factorized(spec.rank, spec.capacity)
    spectrum = 1 / torch.arange(1, spec.rank + 1, dtype=torch.float32)
    layer.singular_values = lambda: spectrum
    plan = s.step(1, {"x": layer})
    stop = min(2 + 40, 128 - 40)
    padded, unpadded = first_rank_above(spectrum, 0.9, 2, stop, length=256), first_rank_above(spectrum, 0.9, 2, stop)
    assert padded != unpadded, "the example must tell the two apart"
    assert s.ranks["x"] == padded and plan.changes[0].rank == padded + 40


# -- schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_steps", [40, 100, 300, 1000, 22_500])
def test_default_schedule_grows_before_stage_2_in_any_run_length(max_steps):
    seen = []
    s = strategy(max_steps=max_steps, warn=seen.append)
    checks = growth_steps(s, max_steps)
    assert not seen, seen
    assert len(checks) >= MIN_CHECKS and max(checks) < s.stage2_step == round(0.25 * max_steps)
    # the authors' proportions: first check at 25/130 of stage 1, about one check every 3/130 of it
    assert checks[0] == pytest.approx(s.stage2_step * 25 / 130, abs=1)


def test_authors_preset_scales_its_schedule_with_the_run():
    config = LowRankConfig(**PRESETS["authors"])
    assert config.parsed_strategy_args.buffer == 100 and config.parsed_strategy_args.inactive_init == "random"
    for max_steps, (warmup, every, stage2) in {22_500: (25, 3, 130), 45_000: (50, 6, 260), 5_625: (6, 1, 32)}.items():
        s = InRank(config)
        s.bind(TrainContext(max_steps=max_steps, warn=lambda m: None))
        assert (s.warmup, s.every, s.stage2_step) == (warmup, every, stage2), max_steps
        assert s.stage2_step < 0.01 * max_steps, "inside the authors' one-epoch warm-up (1% of a 100-epoch run)"
    with pytest.raises(ValueError, match=r"strategy_args\.interval=.* never grow"):
        InRank(config).bind(TrainContext(max_steps=100))  # stage 2 at step 1: no room for a check
    assert set(PRESETS) == {"authors"}


@pytest.mark.parametrize(
    "args, max_steps, message",
    [
        ({"warmup_steps": 500, "stage2_at": None}, 20, r"warmup_steps=500 is not allowed; the first growth check would be at step 500, after the end of training"),
        ({"warmup_steps": 25}, 40, r"warmup_steps=25 .* after stage 2 at step 10 .* ranks would never grow"),
        ({"warmup_steps": 0, "interval": 500, "stage2_at": None}, 20, r"interval=500 .* step 500"),
        ({"stage2_at": 0.001}, 100, r"stage2_at=0\.001 is not allowed; it is step 0 .* stage 2 would never run"),
        ({"stage2_at": 500}, 100, r"stage2_at=500 is step 500, after the end"),
    ],
)
def test_a_schedule_that_never_acts_is_refused_when_training_starts(args, max_steps, message):
    with pytest.raises(ValueError, match=message):
        strategy(max_steps=max_steps, **args)


@pytest.mark.parametrize("value", [0, 0.0])
def test_stage2_at_zero_is_refused_with_the_settings(value):
    with pytest.raises(ValueError, match=r"strategy_args\.stage2_at=0(\.0)? is not allowed; .*step 0 never comes"):
        InRankArgs.from_dict({"stage2_at": value})


def test_a_schedule_that_barely_acts_warns():
    seen = []
    strategy(max_steps=20, warn=seen.append, warmup_steps=18, interval=1, stage2_at=None)
    assert not seen, "checks at 18, 19, 20"
    strategy(max_steps=20, warn=seen.append, warmup_steps=19, interval=1, stage2_at=None)
    assert len(seen) == 1 and "only 2 growth check(s)" in seen[0]
    seen.clear()
    strategy(max_steps=20, warn=seen.append, warmup_steps=1, interval=1, stage2_at=1.0)
    assert len(seen) == 1 and "stage 2 is at the last step" in seen[0]


@pytest.mark.parametrize(
    "args, field",
    [({"warmup_steps": 1.5}, "warmup_steps"), ({"interval": 0.0}, "interval"), ({"interval": 0}, "interval"),
     ({"inactive_init": "gaussian"}, "inactive_init"), ({"stage2_at": -1}, "stage2_at"), ({"threshold": 2.0}, "threshold"),
     ({"bogus": 1}, "bogus")],
)
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ValueError, match=rf"strategy_args(\.{field}=| has unknown key\(s\) \['{field}'\])"):
        InRankArgs.from_dict(args)


# -- inactive components ------------------------------------------------------------------------


def test_inactive_init_chooses_the_layout_and_residual_refuses_random():
    assert strategy().zero_inactive and not strategy(inactive_init="random").zero_inactive
    config = LowRankConfig(target_modules=["c_fc"], mode="residual", strategy="inrank", strategy_args={"inactive_init": "random"})
    with pytest.raises(ValueError, match=r"strategy_args\.inactive_init='random' is not allowed; .*mode='factorized'"):
        get_lowrank_model(build("gpt2"), config)


def test_growth_is_exact_with_zero_inactive_components():
    """Grown components have B = 0, so the product B A is the same matrix, bit for bit; the forward
    then sums over more components (zeros), which a BLAS may round in another order: equal to float32
    rounding, not bit for bit (seen: 1.2e-7 on 2026-12-06 with the same torch)."""
    model = get_lowrank_model(build("gpt2"), LowRankConfig(target_modules=["c_fc"], strategy="inrank", strategy_args={"buffer": 4}))
    with torch.no_grad():
        before = model(input_ids=sample_ids()).logits
        products = {n: layer.dense_weight() for n, layer in model.lowrank_layers().items()}
        for layer in model.lowrank_layers().values():
            layer.grow(layer.capacity)
        for name, layer in model.lowrank_layers().items():
            assert torch.equal(layer.dense_weight(), products[name]), name
        torch.testing.assert_close(model(input_ids=sample_ids()).logits, before, atol=1e-6, rtol=1e-5)


def test_random_inactive_components_reach_the_layers_and_survive_a_checkpoint(tmp_path):
    """The authors' layout: components past the active rank start random (B != 0) and save/load untrimmed."""
    args = {"inactive_init": "random", "buffer": 4}
    zero = get_lowrank_model(build("gpt2"), LowRankConfig(target_modules=["c_fc"], init="kaiming", strategy="inrank"))
    model = get_lowrank_model(
        build("gpt2"), LowRankConfig(target_modules=["c_fc"], init="kaiming", strategy="inrank", strategy_args=args)
    )
    for z, layer in zip(zero.lowrank_layers().values(), model.lowrank_layers().values()):
        assert bool(z.B[:, z.rank :].eq(0).all()), "default: exact growth"
        assert bool(layer.B[:, layer.rank :].ne(0).any()), "random: the inactive components carry values"
    model.save_pretrained(tmp_path / "ckpt", trim=False)
    loaded = type(model).from_pretrained(tmp_path / "ckpt")
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
