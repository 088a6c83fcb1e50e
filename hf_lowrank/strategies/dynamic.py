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

from ..checks import fail, is_int, resolve_size
from ..layer import LayerSpec, LowRankLinear
from ..spectral import condition_ratio, effective_rank, energy_fraction
from .base import LayerChange, Plan, RankStrategy, StateContext, StateFields, StrategyArgs, TrainContext


@dataclass(frozen=True)
class CollapseMetric:
    """A measure of rank collapse of one factorized layer, from the spectrum ``s`` of its ``B A``.

    ``compute(s, layer)`` gives the value; the layers' mean signals collapse when it is below
    (``collapsed_when="below"``) or above (``"above"``) the threshold.
    """

    compute: Callable[[torch.Tensor, LowRankLinear], float]
    collapsed_when: str
    default_threshold: float

    def collapsed(self, value: float, threshold: float) -> bool:
        return value < threshold if self.collapsed_when == "below" else value > threshold


# Pluggable: add an entry before building the LowRankConfig that names it. Thresholds are our choice.
COLLAPSE_METRICS: dict[str, CollapseMetric] = {
    # effective rank (Roy and Vetterli) / active rank: 1 for a flat spectrum, 1/r for rank one
    "effective_rank_ratio": CollapseMetric(lambda s, layer: effective_rank(s) / layer.rank, "below", 0.5),
    # s_1 / s_r over the active rank: grows as the last direction dies (capped at 1e12 to stay finite in JSON)
    "condition_ratio": CollapseMetric(lambda s, layer: min(condition_ratio(s, layer.rank), 1e12), "above", 100.0),
    # energy of the top quarter of the active rank: 1/4 for a flat spectrum, 1 for rank one
    "energy_fraction": CollapseMetric(lambda s, layer: energy_fraction(s, math.ceil(layer.rank / 4)), "above", 0.9),
}


@dataclass
class DynamicArgs(StrategyArgs):
    """Dynamic rank adjustment settings. Schedule points: fraction of training (float) or optimizer step (int)."""

    rank: Union[int, float] = 0.5  # factorized rank: int, or fraction of min(in, out); the paper: 0.5 of the output size
    inflate_at: Union[float, int] = 0.367  # the authors' CIFAR-10 ResNet-20: inflate at epoch 55 of 150
    deflate_at: Union[float, int] = 0.8  # the authors: deflate at epoch 120 of 150 (lr /10 at 100 and 130)
    alpha: float = 16.0  # adapter scale alpha / r after deflating (the paper)
    adapter_rank: Union[int, float, None] = None  # adapter rank after deflating; None: the factorized rank (our choice)
    check_schedule: bool = True  # warn when the dense phase misses the high-lr or the post-decay regime
    high_lr_fraction: float = 0.5  # "high learning rate": at least this fraction of the peak (our choice)
    low_lr_fraction: float = 0.25  # "after a decay": at most this fraction of the peak, after the peak (our choice; the authors decay 10x)
    auto_inflate: bool = False  # inflate when the collapse metric crosses collapse_threshold (inflate_at/deflate_at unused)
    collapse_metric: str = "effective_rank_ratio"  # a key of COLLAPSE_METRICS (the paper's metric was not retrievable)
    collapse_threshold: Union[float, None] = None  # None: the metric's default (0.5, 100, 0.9; our choice)
    check_every: int = 25  # optimizer steps between collapse checks (our choice)
    dense_steps_after_auto: Union[float, int] = 0.433  # dense-phase length after an automatic inflate; the authors' 65 of 150 epochs

    def check(self) -> None:
        for name in ("rank", "adapter_rank"):
            v = getattr(self, name)
            if v is None and name == "adapter_rank":
                continue
            self.require(name, (is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1), "give an int >= 1 or a fraction in (0, 1]")
        for name in ("inflate_at", "deflate_at", "dense_steps_after_auto"):
            v = getattr(self, name)
            self.require(
                name,
                (isinstance(v, float) and 0 < v <= 1) or (is_int(v) and v >= 1),
                "give a fraction of training in (0, 1] or a step >= 1",
            )
        if type(self.inflate_at) is type(self.deflate_at) and self.inflate_at >= self.deflate_at:
            self.fail("inflate_at", self.inflate_at, f"it must come before deflate_at={self.deflate_at!r}")
        self.require_positive("alpha")
        for name in ("check_schedule", "auto_inflate"):
            self.require(name, isinstance(getattr(self, name), bool), "give true or false")
        self.require_fraction("high_lr_fraction")
        self.require_fraction("low_lr_fraction")
        self.require("collapse_metric", self.collapse_metric in COLLAPSE_METRICS, f"choose one of {sorted(COLLAPSE_METRICS)}")
        if self.collapse_threshold is not None:
            self.require_positive("collapse_threshold")
        self.require_positive_int("check_every")


class DynamicRank(RankStrategy):
    """Factorized -> dense -> frozen base plus adapter, on a schedule or on rank collapse."""

    name = "dynamic"
    changes_shapes = True
    modes = ("factorized",)
    modes_why = "starts factorized and moves each layer to dense and then to residual by its own schedule"
    ignores = {
        "rank": "the factorized rank is strategy_args.rank",
        "capacity": "the factors are allocated at strategy_args.rank",
        "alpha": "the residual phase's scale comes from strategy_args.alpha",
        "residual_base": "the residual phase freezes the trained weight as W0",
        "modules_to_save": "the whole model trains in every phase",
    }
    Args = DynamicArgs

    def __init__(self, config):
        super().__init__(config)
        self.phase = "factorized"  # then "dense", then "residual"
        self.inflate_step: int | None = None  # scheduled (bind) or triggered (auto) step of the inflate
        self.deflate_step: int | None = None
        self.metric_history: list[list[float]] = []  # [step, mean collapse metric] of automatic checks

    @property
    def metric(self) -> CollapseMetric:
        return COLLAPSE_METRICS[self.args.collapse_metric]

    @property
    def threshold(self) -> float:
        t = self.args.collapse_threshold
        return self.metric.default_threshold if t is None else t

    def _rank(self, value: int | float, field: str, name: str, layer: LowRankLinear) -> int:
        return resolve_size(value, layer.in_features, layer.out_features, f"strategy_args.{field}", name)

    def initial_spec(self, name: str, layer: LowRankLinear) -> LayerSpec:
        r = self._rank(self.args.rank, "rank", name, layer)
        if self.args.adapter_rank is not None:
            self._rank(self.args.adapter_rank, "adapter_rank", name, layer)  # fail now, not at the deflate
        return LayerSpec("factorized", r, r)

    def bind(self, context: TrainContext) -> None:
        """Fix the schedule; refuse one that never acts, warn when a phase is (nearly) empty.

        An automatic inflate needs a collapse check within the run (``check_every <=
        max_steps``); fewer than two checks, or a deflate at the last step (the adapter never
        trains), are warned about.
        """
        super().bind(context)
        a, max_steps = self.args, context.max_steps
        if a.auto_inflate:
            self.fraction_to_step(a.dense_steps_after_auto, "dense_steps_after_auto")
            if self.phase != "factorized":
                return
            checks = max_steps // a.check_every
            if checks == 0:
                fail(
                    a.field_name("check_every"), a.check_every,
                    f"the first collapse check would be at step {a.check_every}, after the end of training "
                    f"(max_steps={max_steps}), so the model would never inflate; give check_every <= {max_steps}",
                )
            if checks < 2:
                self.warn(
                    f"dynamic: only {checks} collapse check in max_steps={max_steps} (every {a.check_every} steps); "
                    "lower strategy_args.check_every."
                )
            return
        inflate = self.fraction_to_step(a.inflate_at, "inflate_at")
        deflate = self.fraction_to_step(a.deflate_at, "deflate_at")
        if inflate >= deflate:
            raise ValueError(
                f"LowRankConfig.strategy_args.inflate_at={a.inflate_at!r} (step {inflate}) is not before "
                f"deflate_at={a.deflate_at!r} (step {deflate}); the dense phase would be empty."
            )
        self.inflate_step, self.deflate_step = inflate, deflate
        if self.phase == "residual":
            return
        self.warn_if_last_step(deflate, f"deflate_at={a.deflate_at!r}", "the adapter phase never trains", "Move strategy_args.deflate_at earlier")
        if a.check_schedule and self.phase == "factorized":
            for message in self.schedule_problems():
                self.warn(message)

    def schedule_problems(self) -> list[str]:
        """What the dense phase misses of the learning-rate schedule (empty when it covers both regimes).

        ``context.lr_at(i)`` is the rate of the optimizer step that follows ``i`` completed
        steps, so the dense phase trains at ``i`` in ``[inflate_step, deflate_step)``.
        """
        ctx, a = self.context, self.args
        lrs = [float(ctx.lr_at(i)) for i in range(ctx.max_steps)]
        peak = max(lrs, default=0.0)
        if peak <= 0:
            return []
        peak_at = lrs.index(peak)
        phase = range(self.inflate_step, min(self.deflate_step, ctx.max_steps))
        where = f"dynamic: the dense phase (steps {self.inflate_step}-{self.deflate_step} of {ctx.max_steps})"
        problems = []
        if not any(lrs[i] >= a.high_lr_fraction * peak for i in phase):
            problems.append(
                f"{where} never sees a high learning rate (>= {a.high_lr_fraction} x peak {peak:g}); "
                "move strategy_args.inflate_at earlier."
            )
        if not any(i > peak_at and lrs[i] <= a.low_lr_fraction * peak for i in phase):
            problems.append(
                f"{where} never reaches the post-decay regime (<= {a.low_lr_fraction} x peak {peak:g} after the peak "
                f"at step {peak_at}); move strategy_args.deflate_at later or decay the learning rate earlier."
            )
        return problems

    def collapse(self, layers: dict[str, LowRankLinear]) -> float | None:
        """Mean collapse metric over the factorized layers; None when no layer gives a finite spectrum."""
        values = []
        for name, layer in layers.items():
            if layer.mode != "factorized":
                continue
            s = self.singular_values(name, layer)
            if s is not None:
                values.append(float(self.metric.compute(s, layer)))
        return sum(values) / len(values) if values else None

    def due(self, step: int) -> bool:
        if self.phase == "factorized":
            return step % self.args.check_every == 0 if self.args.auto_inflate else step >= self.inflate_step
        return self.phase == "dense" and step >= self.deflate_step

    def step(self, step: int, layers: dict[str, LowRankLinear]) -> Plan | None:
        if not self.due(step):
            return None
        a = self.args
        if self.phase == "factorized":
            if a.auto_inflate:
                value = self.collapse(layers)
                if value is None:
                    return None
                self.metric_history.append([step, value])
                if not self.metric.collapsed(value, self.threshold):
                    return None
                length = max(1, self.fraction_to_step(a.dense_steps_after_auto, "dense_steps_after_auto"))
                self.inflate_step, self.deflate_step = step, min(self.context.max_steps, step + length)
                why = f"{a.collapse_metric}={value:.3g} crossed {self.threshold:g}"
            else:
                why = f"inflate_at={a.inflate_at!r}"
            self.phase = "dense"
            changes = [LayerChange(name, "to_dense") for name, layer in layers.items() if layer.mode != "dense"]
            return Plan(changes, reason=f"dynamic: inflate to dense at step {step} ({why})")
        self.phase = "residual"
        changes = []
        for name, layer in layers.items():
            field = "rank" if a.adapter_rank is None else "adapter_rank"
            r = self._rank(getattr(a, field), field, name, layer)
            changes.append(LayerChange(name, "to_residual", rank=r, capacity=r, alpha=a.alpha))
        return Plan(changes, reason=f"dynamic: deflate to frozen base + adapter at step {step}")

    def is_final(self) -> bool:
        return self.phase == "residual"

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "inflate_step": self.inflate_step,
            "deflate_step": self.deflate_step,
            "metric_history": [list(x) for x in self.metric_history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.phase = state["phase"]
        self.inflate_step = state["inflate_step"]
        self.deflate_step = state["deflate_step"]
        self.metric_history = [list(x) for x in state["metric_history"]]

    def check_state(self, state: Any, ctx: StateContext | None = None) -> None:
        f = StateFields(state, ("phase", "inflate_step", "deflate_step", "metric_history"), ctx)
        phase = f.choice("phase", ("factorized", "dense", "residual"))
        for key in ("inflate_step", "deflate_step"):
            if state[key] is not None or phase != "factorized":
                f.int(key, 0)
        history = state["metric_history"]
        if not isinstance(history, list):
            fail("strategy_state.metric_history", history, "give a list of [step, value] pairs")
        for pair in history:
            if not (isinstance(pair, list) and len(pair) == 2):
                fail("strategy_state.metric_history", pair, "give [step, value] pairs")
            f.int("metric_history", 0, ctx.global_step if ctx else None, pair[0], "strategy_state.metric_history step")
            f.number(pair[1], "strategy_state.metric_history value")
        if ctx is not None:
            # (the residual phase is not checked: a deflate whose SVD failed leaves its layer dense)
            if phase != "residual" and ctx.layers and not any(layer.mode == phase for layer in ctx.layers.values()):
                fail("strategy_state.phase", phase, f"no layer of the model is {phase}, so the checkpoint is in another phase")
