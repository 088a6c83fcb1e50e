"""LowRankConfig: defaults, one precise ValueError per bad field, JSON round trips."""

import dataclasses
import json
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_lowrank import LowRankConfig, __version__
from hf_lowrank.checks import resolve_size
from hf_lowrank.config import CONFIG_NAME, INITS, MODES, RESIDUAL_BASES
from hf_lowrank.strategies import REGISTRY, get_strategy

FIELDS = [f.name for f in dataclasses.fields(LowRankConfig)]


def test_defaults_are_valid_and_documented():
    config = LowRankConfig()
    assert config.mode == "factorized" and config.target_modules == "all-linear" and config.strategy == "fixed"
    assert config.hf_lowrank_version == __version__ and config.rank_pattern == {}
    for f in dataclasses.fields(LowRankConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help text"
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


@pytest.mark.parametrize("strategy", sorted(REGISTRY))
def test_every_strategy_has_valid_defaults(strategy):
    config = LowRankConfig(strategy=strategy)
    assert config.parsed_strategy_args == get_strategy(strategy).Args()


@pytest.mark.parametrize(
    "values",
    [
        {"mode": "residual", "rank": 8, "capacity": 16, "alpha": 16.0},
        {"rank": 0.5, "capacity": 1.0},
        {"rank": 1.0},
        {"rank": 4, "capacity": 0.5},  # mixed kinds: compared per layer, not here
        {"target_modules": ["c_fc", "c_proj"], "exclude_modules": r".*attn.*"},
        {"target_modules": ("q_proj", "k_proj")},
        {"init": "spectral-ones", "init_scale": 0.5, "frobenius_decay": 1e-4},
        {"strategy": "inrank", "strategy_args": {"threshold": 0.8, "buffer": 8}},
        {"residual_base": "orthogonal", "mode": "residual"},
        {"hf_lowrank_version": "0.99.1"},
        {"rank_pattern": {"a.b": {"mode": "factorized", "rank": 2, "capacity": 4, "scaling": 1.0}, "c": {"mode": "dense"}}},
    ],
)
def test_valid_settings(values):
    config = LowRankConfig(**values)
    for key, value in values.items():
        assert getattr(config, key) == (sorted(value) if isinstance(value, tuple) else value)


BAD = [
    ("target_modules", []),
    ("target_modules", ""),
    ("target_modules", None),
    ("target_modules", 5),
    ("target_modules", ["c_fc", ""]),
    ("target_modules", ["c_fc", 3]),
    ("exclude_modules", 5),
    ("exclude_modules", [""]),
    ("mode", "x"),
    ("mode", None),
    ("residual_base", "random"),
    ("init", "x"),
    ("init", "xavier"),
    ("init_scale", 0),
    ("init_scale", -1.0),
    ("init_scale", "1"),
    ("init_scale", math.inf),
    ("init_scale", math.nan),
    ("rank", 0),
    ("rank", -3),
    ("rank", 1.5),
    ("rank", 0.0),
    ("rank", True),
    ("rank", "4"),
    ("rank", None),
    ("rank", math.nan),
    ("capacity", 0),
    ("capacity", 2.0),
    ("capacity", "8"),
    ("alpha", -1),
    ("alpha", 0),
    ("alpha", "16"),
    ("alpha", math.inf),
    ("strategy", "nope"),
    ("strategy", None),
    ("strategy", ["fixed"]),
    ("strategy_args", {"unknown": 1}),
    ("strategy_args", "threshold=0.9"),
    ("frobenius_decay", -1),
    ("frobenius_decay", "1e-4"),
    ("frobenius_decay", math.inf),
    ("frobenius_decay", math.nan),
    ("factor_lr_scale", 0),
    ("factor_lr_scale", math.inf),
    ("rank_pattern", ["a"]),
    ("rank_pattern", {"a": 4}),
    ("rank_pattern", {"a": {"mode": "lowrank", "rank": 2}}),
    ("rank_pattern", {"a": {"mode": "factorized", "rank": 2, "colour": "red"}}),
    ("base_model_name_or_path", 5),
    ("hf_lowrank_version", "9.0.0"),
    ("hf_lowrank_version", "latest"),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_each_bad_field_raises_a_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=rf"LowRankConfig\.{name}\b"):
        LowRankConfig(**{name: value})


def test_bad_field_messages_say_what_is_allowed():
    with pytest.raises(ValueError, match="choose one of 'dense', 'factorized', 'residual'"):
        LowRankConfig(mode="x")
    with pytest.raises(ValueError, match=r"capacity=4 is smaller than rank=8"):
        LowRankConfig(rank=8, capacity=4)
    with pytest.raises(ValueError, match=r"capacity=0\.25 is smaller than rank=0\.5"):
        LowRankConfig(rank=0.5, capacity=0.25)
    with pytest.raises(ValueError, match=r"strategy_args has unknown key\(s\) \['unknown'\].*known keys are"):
        LowRankConfig(strategy_args={"unknown": 1})
    with pytest.raises(ValueError, match=r"LowRankConfig\.strategy_args\.threshold=2\.0"):
        LowRankConfig(strategy="inrank", strategy_args={"threshold": 2.0})
    with pytest.raises(ValueError, match=r"choose one of \[.*'cuttlefish', .*'dynamic', .*'fixed', .*'inrank', .*'warm_start'\]"):
        LowRankConfig(strategy="nope")


def test_resolve_size():
    assert resolve_size(0.25, 128, 32) == 8
    assert resolve_size(1.0, 128, 32) == 32
    assert resolve_size(0.001, 128, 32) == 1, "at least 1"
    assert resolve_size(7, 128, 32) == 7
    with pytest.raises(ValueError, match=r"LowRankConfig\.capacity=40 is larger than min\(in_features, out_features\)=32 for layer 'x'"):
        resolve_size(40, 128, 32, "capacity", "x")


# -- serialisation ----------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    config = LowRankConfig(
        target_modules=["c_fc", "c_proj"], mode="residual", rank=8, capacity=16, alpha=16.0, strategy="inrank",
        strategy_args={"threshold": 0.8}, frobenius_decay=1e-4, base_model_name_or_path="gpt2",
        rank_pattern={"transformer.h.0.mlp.c_fc": {"mode": "residual", "rank": 8, "capacity": 16, "scaling": 2.0}},
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(data) == set(FIELDS)
    assert LowRankConfig.from_pretrained(tmp_path) == config
    assert LowRankConfig.from_dict(config.to_dict()) == config
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"somewhere: unknown LowRankConfig field\(s\) \['colour', 'size'\]; known fields are \["):
        LowRankConfig.from_dict({"rank": 4, "colour": "red", "size": 3}, source="somewhere")


def test_from_pretrained_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / CONFIG_NAME))):
        LowRankConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"rank": 0}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / CONFIG_NAME)) + r": LowRankConfig\.rank=0"):
        LowRankConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"hf_lowrank_version": "9.0.0"}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / CONFIG_NAME)) + ".*incompatible hf_lowrank"):
        LowRankConfig.from_pretrained(tmp_path)


# -- any value: a valid config or a ValueError naming the field --------------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.text(max_size=6), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-2, 5), max_size=2),
)
FIELD_VALUES = {
    "target_modules": st.one_of(junk, st.sampled_from(["all-linear", r".*\.mlp\..*"]), st.lists(st.sampled_from(["c_fc", "q_proj"]), min_size=1)),
    "exclude_modules": st.one_of(junk, st.lists(st.sampled_from(["c_attn", "lm_head"]), min_size=1)),
    "mode": st.one_of(junk, st.sampled_from(MODES)),
    "residual_base": st.one_of(junk, st.sampled_from(RESIDUAL_BASES)),
    "init": st.one_of(junk, st.sampled_from(INITS)),
    "init_scale": st.one_of(junk, st.floats(0.01, 10)),
    "rank": st.one_of(junk, st.integers(1, 64), st.floats(0.01, 1.0)),
    "capacity": st.one_of(junk, st.integers(1, 64), st.floats(0.01, 1.0)),
    "alpha": st.one_of(junk, st.floats(0.1, 64)),
    "strategy": st.one_of(junk, st.sampled_from(sorted(REGISTRY))),
    "strategy_args": st.one_of(junk, st.dictionaries(st.sampled_from(["threshold", "buffer", "interval", "x"]), junk, max_size=2)),
    "frobenius_decay": st.one_of(junk, st.floats(0, 1e-2)),
    "factor_lr_scale": st.one_of(junk, st.floats(0.1, 10)),
    "rank_pattern": st.one_of(
        junk,
        st.dictionaries(
            st.text(min_size=1, max_size=6),
            st.fixed_dictionaries({"mode": st.one_of(junk, st.sampled_from(MODES)), "rank": junk}),
            max_size=2,
        ),
    ),
    "base_model_name_or_path": st.one_of(junk, st.just("gpt2")),
    "hf_lowrank_version": st.one_of(junk, st.sampled_from(["0.1.0", "0.2", "1.0.0", "9.0.0", "x.y"])),
}


@st.composite
def field_values(draw):
    """Up to three fields, each valid or junk; the rest default (so the last checks are reached too)."""
    names = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=3, unique=True))
    return {name: draw(FIELD_VALUES[name]) for name in names}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field_values())
def test_any_values_give_a_config_or_a_value_error_naming_a_field(values):
    try:
        config = LowRankConfig(**values)
    except ValueError as e:
        assert re.search(r"LowRankConfig\.(\w+)", str(e)), str(e)
        named = re.search(r"LowRankConfig\.(\w+)", str(e)).group(1)
        assert named in FIELDS, str(e)
        assert named in values, f"{named} was not given: {e}"
        return
    again = LowRankConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("strategy", ["cuttlefish", "warm_start"])
def test_a_mode_a_strategy_never_uses_is_refused_naming_what_it_does(strategy):
    """Residual under a strategy that starts dense would give full fine-tuning then a lossy SVD, not adapters."""
    with pytest.raises(ValueError, match=rf"mode='residual' is not allowed; strategy '{strategy}' .*dense.*no residual phase.*'inrank' or 'fixed' with mode='residual'"):
        LowRankConfig(target_modules=["c_fc"], mode="residual", strategy=strategy)
    with pytest.raises(ValueError, match=r"mode='dense' is not allowed; strategy 'inrank' grows factor ranks"):
        LowRankConfig(target_modules=["c_fc"], mode="dense", strategy="inrank")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"strategy": "inrank", "rank": 8}, r"rank=8 is not used by strategy 'inrank': ranks start at strategy_args\.initial_rank .* capacity"),
        ({"strategy": "cuttlefish", "capacity": 0.5}, r"capacity=0\.5 is not used by strategy 'cuttlefish'"),
        ({"strategy": "warm_start", "init": "kaiming"}, r"init='kaiming' is not used by strategy 'warm_start': the factors come from the SVD"),
        ({"strategy": "dynamic", "rank": 4}, r"rank=4 is not used by strategy 'dynamic': the factorized rank is strategy_args\.rank"),
        ({"strategy": "fixed", "alpha": 16.0}, r"alpha=16\.0 is not used by strategy 'fixed': mode='factorized' .*only mode='residual' uses it"),
    ],
)
def test_a_setting_a_strategy_ignores_is_warned_about(settings, message):
    with pytest.warns(UserWarning, match=message) as caught:
        LowRankConfig(target_modules=["c_fc"], **settings)
    assert caught[0].filename == __file__, "the warning points at the line that built the config"


def test_settings_a_strategy_uses_and_saved_configs_pass_quietly():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LowRankConfig(target_modules=["c_fc"], strategy="inrank", capacity=0.5, mode="residual", alpha=16.0)
        LowRankConfig(target_modules=["c_fc"], strategy="warm_start", rank=0.375)
        LowRankConfig(target_modules=["c_fc"], strategy="fixed", mode="residual", rank=4, alpha=8.0)
        pattern = {"h.0.mlp.c_fc": {"mode": "factorized", "rank": 4, "capacity": 4, "scaling": 1.0}}
        LowRankConfig(target_modules=["c_fc"], strategy="inrank", rank=8, rank_pattern=pattern)  # a saved model loads as saved
