"""Dynamic rank adjustment (Shin et al., 2025): interleave a full-rank phase into low-rank training.

Factorized start -> **inflate** (merge ``B A`` into a dense ``W`` and train dense) -> **deflate**
(freeze ``W`` as ``W0``, continue with a fresh adapter, ``B = 0``, scale ``alpha / r``). The
dense phase should see both the high-learning-rate and the post-decay regime; the schedule is
checked against the run's learning-rate schedule when training starts. Instead of a fixed
inflate point, an automatic inflate can fire when a collapse metric crosses a threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from ..config import resolve_size
from ..layer import LayerSpec, LowRankLinear
from ..spectral import effective_rank, energy_fraction
from .base import LayerChange, Plan, RankStrategy, StrategyArgs

# Collapse metrics: f(singular values of B A, active rank) -> value in [0, 1], lower = more collapsed.
COLLAPSE_METRICS: dict[str, Callable[[torch.Tensor, int], float]] = {
    "effective_rank_ratio": lambda s, r: effective_rank(s) / r,
    "inverse_condition": lambda s, r: float(s[r - 1] / s[0]) if float(s[0]) > 0 else 0.0,
    "tail_energy": lambda s, r: 1.0 - energy_fraction(s, math.ceil(r / 4)),
}


@dataclass
class DynamicArgs(StrategyArgs):
    """Dynamic rank adjustment settings. Schedule points: fraction of training (float) or step (int)."""

    rank: Union[int, float] = 0.5  # factorized rank; the paper: 0.5 of the output size (we use min(in, out))
    inflate_at: Union[float, int] = 0.367  # the authors' CIFAR-10 schedule: inflate at epoch 55 of 150
    deflate_at: Union[float, int] = 0.8  # deflate at epoch 120 of 150 (lr decays at 100 and 130)
    alpha: float = 16.0  # adapter scale alpha / r after deflating (the paper)
    adapter_rank: Union[int, float, None] = None  # adapter rank after deflating; None = rank
    check_schedule: bool = True  # warn when the dense phase misses the high-lr or the post-decay regime
    high_lr_fraction: float = 0.5  # "high learning rate" = at least this fraction of the peak (our choice)
    low_lr_fraction: float = 0.2  # "after a decay" = at most this fraction of the peak, after the peak (our choice)
    auto_inflate: bool = False  # inflate when the collapse metric falls below collapse_threshold
    collapse_metric: str = "effective_rank_ratio"  # a key of COLLAPSE_METRICS
    collapse_threshold: float = 0.5  # mean metric over factorized layers that counts as collapse (our choice)
    check_every: int = 25  # optimizer steps between collapse checks
    auto_dense_steps: Union[float, int] = 0.2  # length of the dense phase after an automatic inflate

    def check(self) -> None:
        for name in ("rank", "adapter_rank"):
            v = getattr(self, name)
            if name == "adapter_rank" and v is None:
                continue
            self.require(
                name,
                (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
                "give an int >= 1 or a fraction in (0, 1]",
            )
        for name in ("inflate_at", "deflate_at", "auto_dense_steps"):
            v = getattr(self, name)
            self.require(
                name,
                (isinstance(v, float) and 0 <= v <= 1) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                "give a fraction of training in [0, 1] or a step >= 0",
            )
        if type(self.inflate_at) is type(self.deflate_at) and self.inflate_at >= self.deflate_at and not self.auto_inflate:
            self.fail("inflate_at", self.inflate_at, f"it must come before deflate_at={self.deflate_at!r}")
        self.require_positive("alpha")
        self.require_fraction("high_lr_fraction")
        self.require_fraction("low_lr_fraction")
        self.require("collapse_metric", self.collapse_metric in COLLAPSE_METRICS, f"choose one of {sorted(COLLAPSE_METRICS)}")
        self.require_positive("collapse_threshold")
        self.require_positive_int("check_every")


class DynamicRank(RankStrategy):
    """Factorized -> dense -> frozen base plus adapter, on a schedule or on rank collapse."""

    name = "dynamic"
    Args = DynamicArgs

    def __init__(self, config):
        super().__init__(config)
        self.phase = "factorized"
        self.inflate_step: int | None = None
        self.deflate_step: int | None = None
        self.metric_history: list[list[float]] = []  # [step, metric] of automatic checks

    def _rank(self, value, name: str, layer: LowRankLinear) -> int:
        return resolve_size(value, layer.in_features, layer.out_features, "strategy_args.rank", name)

    def initial_spec(self, name: str, layer: LowRankLinear) -> LayerSpec:
        r = self._rank(self.args.rank, name, layer)
        return LayerSpec("factorized", r, r)

    def bind(self, context) -> None:
        super().bind(context)
        a = self.args
        if self.inflate_step is None and not a.auto_inflate:
            self.inflate_step = self.fraction_to_step(a.inflate_at, "inflate_at")
            self.deflate_step = self.fraction_to_step(a.deflate_at, "deflate_at")
            if self.inflate_step >= self.deflate_step:
                raise ValueError(
                    f"LowRankConfig.strategy_args.inflate_at={a.inflate_at!r} (step {self.inflate_step}) is not before "
                    f"deflate_at={a.deflate_at!r} (step {self.deflate_step}); the dense phase would be empty."
                )
            if a.check_schedule:
                for message in self.schedule_problems():
                    context.warn(message)
        self.fraction_to_step(a.auto_dense_steps, "auto_dense_steps")

    def schedule_problems(self) -> list[str]:
        """What the dense phase misses of the learning-rate schedule (empty when it covers both regimes)."""
        ctx, a = self.context, self.args
        lrs = [ctx.lr_at(s) for s in range(ctx.max_steps)]
        peak = max(lrs) if lrs else 0.0
        if peak <= 0:
            return []
        peak_step = lrs.index(peak)
        phase = range(self.inflate_step, self.deflate_step)
        problems = []
        if not any(lrs[s] >= a.high_lr_fraction * peak for s in phase):
            problems.append(
                f"dynamic: the dense phase (steps {self.inflate_step}-{self.deflate_step}) never sees a high learning rate "
                f"(>= {a.high_lr_fraction} x peak); move inflate_at earlier."
            )
        if not any(s > peak_step and lrs[s] <= a.low_lr_fraction * peak for s in phase):
            problems.append(
                f"dynamic: the dense phase (steps {self.inflate_step}-{self.deflate_step}) never reaches the post-decay regime "
                f"(<= {a.low_lr_fraction} x peak); move deflate_at later."
            )
        return problems

    def collapse(self, layers: dict[str, LowRankLinear]) -> float | None:
        """Mean collapse metric over factorized layers; None when no layer gives a finite spectrum."""
        values = []
        for name, layer in layers.items():
            if layer.mode != "factorized":
                continue
            s = self.singular_values(name, layer)
            if s is not None:
                values.append(COLLAPSE_METRICS[self.args.collapse_metric](s, layer.rank))
        return sum(values) / len(values) if values else None

    def due(self, step: int) -> bool:
        if self.phase == "factorized":
            return step == self.inflate_step if not self.args.auto_inflate else step % self.args.check_every == 0
        return self.phase == "dense" and step == self.deflate_step

    def step(self, step: int, layers: dict[str, LowRankLinear]) -> Plan | None:
        if not self.due(step):
            return None
        a = self.args
        if self.phase == "factorized" and a.auto_inflate:
            metric = self.collapse(layers)
            if metric is None:
                return None
            self.metric_history.append([step, metric])
            if metric >= a.collapse_threshold:
                return None
            self.inflate_step = step
            self.deflate_step = min(self.context.max_steps, step + max(1, self.fraction_to_step(a.auto_dense_steps, "auto_dense_steps")))
        if self.phase == "factorized":
            self.phase = "dense"
            return Plan([LayerChange(n, "to_dense") for n in layers], reason=f"dynamic: inflate to dense at step {step}")
        self.phase = "residual"
        changes = []
        for name, layer in layers.items():
            r = self._rank(a.adapter_rank if a.adapter_rank is not None else a.rank, name, layer)
            changes.append(LayerChange(name, "to_residual", rank=r, capacity=r, alpha=a.alpha))
        return Plan(changes, reason=f"dynamic: deflate to frozen base + adapter at step {step}")

    def is_final(self) -> bool:
        return self.phase == "residual"

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "inflate_step": self.inflate_step,
            "deflate_step": self.deflate_step,
            "metric_history": self.metric_history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = state["phase"]
        self.inflate_step = state["inflate_step"]
        self.deflate_step = state["deflate_step"]
        self.metric_history = [list(x) for x in state["metric_history"]]
