"""Rank strategies: one module per method behind the :class:`RankStrategy` interface.

Each built-in module defines a ``RankStrategy`` subclass with a ``name``, which registers it;
importing this package imports them all. A strategy in a user's own file registers the same
way when its module is imported by the user's code (a config naming ``"module:Class"`` finds it then;
hf_lowrank imports such a module itself only with ``trust_remote_code=True``).
"""

from __future__ import annotations

from . import cuttlefish, dynamic, fixed, inrank, warm_start  # noqa: F401  (registers the built-ins)
from .base import (
    OPS,
    REGISTRY,
    LayerChange,
    Plan,
    RankStrategy,
    StateContext,
    StateFields,
    StrategyArgs,
    TrainContext,
    UnavailableStrategy,
    find_strategy,
    get_strategy,
    register_strategy,
)

__all__ = [
    "OPS",
    "REGISTRY",
    "LayerChange",
    "Plan",
    "RankStrategy",
    "StateContext",
    "StateFields",
    "StrategyArgs",
    "TrainContext",
    "UnavailableStrategy",
    "find_strategy",
    "get_strategy",
    "register_strategy",
]
