"""Metric scripts shipped with the package, loaded by path so that no Hub access is needed."""

from __future__ import annotations

import math
from pathlib import Path

import evaluate

_HERE = Path(__file__).parent
METRICS = tuple(sorted(p.name for p in _HERE.iterdir() if (p / f"{p.name}.py").is_file()))


def load_metric(name: str) -> evaluate.EvaluationModule:
    """``evaluate.load`` of a shipped metric script ("accuracy" or "f1")."""
    if name not in METRICS:
        raise ValueError(f"metric {name!r} is not shipped; available: {', '.join(METRICS)}.")
    return evaluate.load(str(_HERE / name / f"{name}.py"))


def perplexity(eval_loss: float) -> float:
    """``exp(eval_loss)``, inf when it overflows."""
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return math.inf
