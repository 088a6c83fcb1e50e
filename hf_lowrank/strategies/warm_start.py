"""Dense warm start (Kamalakara et al., 2022): dense for a while, then SVD to factorized.

The fixed-rank parts of the same paper need no strategy of their own: spectral init,
spectral-ones and Frobenius decay are ``strategy="fixed"`` with ``LowRankConfig(init="spectral"
| "spectral-ones", frobenius_decay=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ..checks import fail, resolve_rank_and_capacity
from ..layer import LayerSpec, LowRankLinear
from .base import LayerChange, Plan, RankStrategy, StateContext, StateFields, StrategyArgs, TrainContext


@dataclass
class WarmStartArgs(StrategyArgs):
    """Warm-start settings. The rank is ``LowRankConfig.rank`` (and ``capacity``)."""

    dense_steps: Union[float, int] = 0.5  # dense phase: fraction of training (float) or optimizer steps (int); measured (docs/benchmarks.md), the paper gives no number
    lr_factor: float = 1.0  # learning-rate multiplier at the switch; the paper halves it (0.5), which measured worse (docs/methods.md)
    spectral_ones: bool = False  # split with the singular values set to 1 (spectral-ones) instead of the balanced SVD

    def check(self) -> None:
        v = self.dense_steps
        self.require(
            "dense_steps",
            (isinstance(v, float) and 0 < v < 1) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            "give a fraction of training in (0, 1) or a number of steps >= 1",
        )
        self.require_positive("lr_factor")
        self.require("spectral_ones", isinstance(self.spectral_ones, bool), "give true or false")


class WarmStart(RankStrategy):
    """Dense until ``dense_steps``, then every layer is split at ``LowRankConfig.rank``."""

    name = "warm_start"
    changes_shapes = True
    modes = ("dense", "factorized")
    modes_why = (
        "trains every layer dense for strategy_args.dense_steps, then factorizes it (W = B A) at LowRankConfig.rank; it has no residual phase (for adapters over frozen pretrained weights use strategy 'inrank' or "
        "'fixed' with mode='residual')"
    )
    ignores = {
        "init": "the factors come from the SVD of the trained dense weight (strategy_args.spectral_ones sets the ones variant)",
        "init_scale": "the factors come from the SVD of the trained dense weight",
    }
    Args = WarmStartArgs

    def __init__(self, config):
        super().__init__(config)
        self.switch_step: int | None = None  # set by bind
        self.switched_at: int | None = None

    def initial_spec(self, name: str, layer: LowRankLinear) -> LayerSpec:
        self._rank_and_capacity(name, layer)  # a rank the layer cannot take fails now, not at the switch
        return LayerSpec("dense")

    def _rank_and_capacity(self, name: str, layer: LowRankLinear) -> tuple[int, int]:
        """Rank and capacity of ``layer`` after the switch, from ``LowRankConfig.rank`` / ``capacity``."""
        c = self.config
        rank, capacity = resolve_rank_and_capacity(c.rank, c.capacity, layer.in_features, layer.out_features, name)
        return rank, capacity

    def bind(self, context: TrainContext) -> None:
        """Fix the switch step; warn when the dense or the factorized phase would (nearly) vanish."""
        super().bind(context)
        a, max_steps = self.args, context.max_steps
        self.switch_step = max(1, self.fraction_to_step(a.dense_steps, "dense_steps"))  # step 0 never comes: after step 1
        if self.switched_at is not None:
            return
        if self.switch_step == 1 and max_steps > 1:
            self.warn(
                f"warm_start: dense_steps={a.dense_steps!r} of max_steps={max_steps} is a single dense step, barely a "
                "warm start. Give a larger strategy_args.dense_steps."
            )
        self.warn_if_last_step(
            self.switch_step, f"the switch (dense_steps={a.dense_steps!r})", "the factorized model is never trained",
            "Give a smaller strategy_args.dense_steps",
        )

    def due(self, step: int) -> bool:
        return self.switched_at is None and step >= self.switch_step

    def step(self, step: int, layers: dict[str, LowRankLinear]) -> Plan | None:
        if not self.due(step):
            return None
        self.switched_at = step
        changes = []
        for name, layer in layers.items():
            rank, capacity = self._rank_and_capacity(name, layer)
            changes.append(LayerChange(name, "to_factorized", rank=rank, capacity=capacity, ones=self.args.spectral_ones))
        return Plan(changes, lr_factor=self.args.lr_factor, reason=f"warm start: dense -> factorized at step {step}")

    def is_final(self) -> bool:
        return self.switched_at is not None

    def state_dict(self) -> dict[str, Any]:
        return {"switched_at": self.switched_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.switched_at = state["switched_at"]

    def check_state(self, state: Any, ctx: StateContext | None = None) -> None:
        f = StateFields(state, ("switched_at",), ctx)
        switched = f.step("switched_at")
        if switched == 0:
            fail("strategy_state.switched_at", 0, "the switch comes after an optimizer step: give a step >= 1 or null")
        if ctx is None:
            return
        if switched is not None and switched not in ctx.plan_steps:
            fail("strategy_state.switched_at", switched, f"no plan was applied at that step (plans at {sorted(ctx.plan_steps)}); "
                 "give the step of the dense -> factorized switch, or null before it")
        if switched is None and any(layer.mode != "dense" for layer in ctx.layers.values()):
            fail("strategy_state.switched_at", None, "the layers are already factorized, so the switch happened; give its step")
