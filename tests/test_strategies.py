"""Checks shared by every strategy: Args validation, schedule points, the registry.

Each strategy's own behaviour is tested in tests/test_strategies_<name>.py.
"""

import pytest
from conftest import build

from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.strategies import TrainContext, get_strategy


def wrap(strategy: str, max_steps: int = 100, lr_at=lambda s: 1.0, **kw):
    config = LowRankConfig(target_modules=["c_fc", "c_proj"], exclude_modules=r".*attn.*", strategy=strategy, **kw)
    model = get_lowrank_model(build("gpt2"), config).eval()
    warnings = []
    model.strategy.bind(TrainContext(max_steps=max_steps, lr_at=lr_at, warn=warnings.append))
    return model, warnings


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
        assert get_strategy(name).name == name
