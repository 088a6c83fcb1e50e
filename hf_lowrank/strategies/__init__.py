"""Rank strategies: one module per method behind the :class:`RankStrategy` interface."""

from __future__ import annotations

import importlib

from .base import LayerChange, Plan, RankStrategy, StrategyArgs, TrainContext

# name -> "module:Class"; imported on first use so that adding a method means adding a module.
REGISTRY = {
    "fixed": "fixed:FixedRank",
    "inrank": "inrank:InRank",
    "cuttlefish": "cuttlefish:Cuttlefish",
    "warm_start": "warm_start:WarmStart",
    "dynamic": "dynamic:DynamicRank",
}


def strategy_class(name: str) -> type[RankStrategy]:
    """The strategy class registered under ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"LowRankConfig.strategy={name!r} is not allowed; choose one of {sorted(REGISTRY)}.")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


__all__ = ["REGISTRY", "LayerChange", "Plan", "RankStrategy", "StrategyArgs", "TrainContext", "strategy_class"]
