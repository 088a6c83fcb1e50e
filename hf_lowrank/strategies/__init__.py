"""Rank strategies: one module per method behind the :class:`RankStrategy` interface.

Each built-in module defines a ``RankStrategy`` subclass with a ``name``, which registers it;
importing this package imports them all. A strategy in a user's own file registers the same
way when its module is imported (or is named ``"module:Class"`` in a config).
"""

from __future__ import annotations

from . import cuttlefish, dynamic, fixed, inrank, warm_start  # noqa: F401  (registers the built-ins)
from .base import OPS, REGISTRY, LayerChange, Plan, RankStrategy, StrategyArgs, TrainContext, get_strategy, register_strategy

__all__ = [
    "OPS",
    "REGISTRY",
    "LayerChange",
    "Plan",
    "RankStrategy",
    "StrategyArgs",
    "TrainContext",
    "get_strategy",
    "register_strategy",
]
