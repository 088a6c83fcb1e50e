"""One contract every strategy of the library keeps: layout, plans, state round trip, resume.

Parametrized over the registry, so a strategy module added under hf_lowrank/strategies/ is
tested here without editing this file. Each strategy's own behaviour, its settings' validation
and its schedule checks: tests/test_strategies_<name>.py.
"""

from __future__ import annotations

import json

import pytest
from helpers_train import run

from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.strategies import OPS, REGISTRY, RankStrategy, get_strategy
from hf_lowrank.strategies.base import StrategyArgs

MEASURED = {"dense_s", "factorized_s", "speedup", "why"}  # wall-clock profiling (Cuttlefish): differs run to run
LIBRARY = sorted(name for name, cls in REGISTRY.items() if cls.__module__.startswith("hf_lowrank.strategies."))
STEPS, SAVE = 24, 8


def deterministic(state):
    """A strategy state without its wall-clock measurements."""
    if isinstance(state, dict):
        return {k: deterministic(v) for k, v in state.items() if k not in MEASURED}
    if isinstance(state, list):
        return [deterministic(v) for v in state]
    return state


# Settings for a 24-step run of a model this small, where a default would keep the layout as it is.
SHORT_RUN = {"cuttlefish": {"select_layers": "all"}}  # measured selection keeps layers this small dense


def lowrank(name: str) -> dict:
    return {"strategy": name, "strategy_args": SHORT_RUN.get(name, {}), "target_modules": ["c_fc", "c_proj"], "exclude_modules": r".*attn.*"}


def test_every_builtin_strategy_is_registered():
    assert {"fixed", "inrank", "cuttlefish", "warm_start", "dynamic"} <= set(LIBRARY)


@pytest.mark.parametrize("name", LIBRARY)
def test_declared_interface(name):
    cls = REGISTRY[name]
    assert issubclass(cls, RankStrategy) and cls.name == name
    assert get_strategy(name) is cls, "a config's strategy name resolves to the registered class"
    assert isinstance(cls.changes_shapes, bool)
    assert issubclass(cls.Args, StrategyArgs) and cls.Args.from_dict({}) == cls.Args()
    assert cls.__doc__, "a strategy says what it does"


@pytest.mark.slow
@pytest.mark.parametrize("name", LIBRARY)
def test_strategy_contract(name, tmp_path):
    from helpers_train import tiny_gpt2

    # Layout: every target layer starts in the layout the strategy gives it.
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**lowrank(name)))
    fresh = REGISTRY[name](model.lowrank_config)
    for layer_name, layer in model.lowrank_layers().items():
        assert layer.spec.mode == fresh.initial_spec(layer_name, layer).mode

    # Plans: valid ops on known layers; a strategy that declares no shape changes makes none.
    full = run(tmp_path / "full", lowrank=lowrank(name), max_steps=STEPS, save_steps=SAVE)
    history = json.loads((tmp_path / "full" / "checkpoint-24" / "lowrank_trainer_state.json").read_text())["plan_history"]
    for entry in history:
        for change in entry["changes"]:
            assert change["op"] in OPS and change["layer"] in model.lowrank_layers()
            if not REGISTRY[name].changes_shapes:
                assert change["op"] == "grow", f"{name} declares changes_shapes=False"

    if REGISTRY[name].changes_shapes:
        assert full["plan_steps"], f"{name} acts within the run, so resume below is tested across its changes"

    # State: JSON round trip gives the same state.
    strategy = REGISTRY[name](model.lowrank_config)
    strategy.load_state_dict(json.loads(json.dumps(full["strategy_state"])))
    assert strategy.state_dict() == full["strategy_state"]

    # Resume from a checkpoint continues the same run: same losses, layout and state.
    resumed = run(
        tmp_path / "full", resume=str(tmp_path / "full" / f"checkpoint-{SAVE}"), lowrank=lowrank(name),
        max_steps=STEPS, save_steps=SAVE,
    )
    after = {s: v for s, v in full["losses"].items() if int(s) > SAVE}
    assert {s: v for s, v in resumed["losses"].items() if int(s) > SAVE} == pytest.approx(after, rel=1e-5, abs=1e-6)
    assert resumed["rank_pattern"] == full["rank_pattern"]
    assert deterministic(resumed["strategy_state"]) == deterministic(full["strategy_state"])
    assert resumed["plan_steps"] == full["plan_steps"]


# -- a corrupted strategy state is refused, naming the file and the field --------------------------

# Per strategy: (field, how the state is corrupted). Every strategy of the library has cases here.
CORRUPT = {
    "fixed": [("strategy_state", lambda s, layers: {"ranks": {}})],
    "inrank": [
        ("strategy_state.frozen", lambda s, layers: {**s, "frozen": "false"}),  # bool("false") was True
        ("strategy_state.buffers", lambda s, layers: {**s, "buffers": {n: 10**6 for n in s["buffers"]}}),
        ("strategy_state.ranks", lambda s, layers: {**s, "ranks": {n: 10**12 for n in s["ranks"]}}),
        ("strategy_state.ranks", lambda s, layers: {**s, "ranks": dict(list(s["ranks"].items())[1:]), "buffers": dict(list(s["buffers"].items())[1:])}),
        ("strategy_state.ranks", lambda s, layers: {**s, "ranks": {"transformer.h.9.mlp.c_fc": 2}, "buffers": {"transformer.h.9.mlp.c_fc": 2}}),
    ],
    "cuttlefish": [
        ("strategy_state.switched_at", lambda s, layers: {**s, "switched_at": 3}),  # a switch without its decisions
        ("strategy_state.switched_at", lambda s, layers: {**s, "switched_at": "x"}),
        ("strategy_state.xi", lambda s, layers: {**s, "xi": {layers[0]: "big"}}),
        ("strategy_state.stable", lambda s, layers: {**s, "stable": {layers[0]: "false"}}),
    ],
    "warm_start": [
        ("strategy_state.switched_at", lambda s, layers: {**s, "switched_at": "x"}),
        ("strategy_state.switched_at", lambda s, layers: {**s, "switched_at": 2}),  # no switch was applied at step 2
        ("strategy_state.switched_at", lambda s, layers: {**s, "switched_at": 10**9}),  # after the checkpoint's step
    ],
    "dynamic": [
        ("strategy_state.phase", lambda s, layers: {**s, "phase": "bogus"}),
        ("strategy_state.phase", lambda s, layers: {**s, "phase": "dense", "inflate_step": 1, "deflate_step": 2}),  # layers are factorized
        ("strategy_state.inflate_step", lambda s, layers: {**s, "inflate_step": -3}),
        ("strategy_state.metric_history", lambda s, layers: {**s, "metric_history": [[1, "nan"]]}),
    ],
}
GENERIC = [  # every strategy: not a dict, a key missing, a key too many
    ("strategy_state", lambda s, layers: [s]),
    ("strategy_state", lambda s, layers: {**s, "extra": 1}),
    ("strategy_state", lambda s, layers: dict(list(s.items())[1:]) if s else {"extra": 1}),
]


def test_every_strategy_has_corrupted_state_cases():
    assert set(CORRUPT) == set(LIBRARY)


@pytest.mark.parametrize("name", LIBRARY)
def test_a_corrupted_strategy_state_is_refused_naming_the_file_and_the_field(name):
    """A checkpoint is untrusted: each corrupted state raises before anything is restored, naming file and field."""
    from helpers_train import tiny_gpt2

    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**lowrank(name)))
    good = model.lowrank_state_dict()
    good["global_step"] = 4
    model.load_lowrank_state_dict(json.loads(json.dumps(good)), source="ckpt/lowrank_trainer_state.json")  # the valid state loads
    layers = sorted(model.lowrank_layers())
    for field, corrupt in CORRUPT[name] + GENERIC:
        state = json.loads(json.dumps(good))
        state["strategy_state"] = corrupt(state["strategy_state"], layers)
        before = model.strategy.state_dict()
        with pytest.raises(ValueError, match=r"^ckpt/lowrank_trainer_state\.json: .*" + field.replace(".", r"\.")) as e:
            model.load_lowrank_state_dict(state, source="ckpt/lowrank_trainer_state.json")
        assert model.strategy.state_dict() == before, f"nothing restored from {e.value}"
