"""InRank (Zhao et al., 2023): ranks grow by an explained-variance test, then freeze.

Stage 1: every ``interval`` optimizer steps after ``warmup``, each layer's active product
``B[:, :r+b] A[:r+b]`` is tested; the rank ``r`` rises to the first ``k`` whose explained
ratio exceeds ``threshold`` (never shrinking, capped at ``capacity - buffer``), and the
forward keeps using ``r + buffer`` components. Stage 2 (InRank-Efficient): at ``stage2_at``
every layer is SVD-truncated to ``r``, the buffer is dropped, and ranks stay fixed.

``LowRankConfig.mode`` picks the variant: ``"factorized"`` is InRank-Efficient (the authors'
code), ``"residual"`` the paper's original ``W = W0 + B A`` over a frozen base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from ..checks import resolve_size
from ..layer import LayerSpec, LowRankLinear
from ..spectral import first_rank_above
from .base import LayerChange, Plan, RankStrategy, StrategyArgs


@dataclass
class InRankArgs(StrategyArgs):
    """InRank settings. Defaults suit models of a few million parameters; see ``PRESETS["authors"]``."""

    initial_rank: int = 2  # r0, the authors' default
    buffer: Union[int, float] = 0.25  # b; authors: 100 (for d=768). A float is a fraction of the capacity.
    threshold: float = 0.9  # alpha of the explained-ratio test; authors: 0.9 (0.8 in an ablation)
    warmup_steps: int = 25  # optimizer steps before the first check; authors: 200 forward calls ~ 25 steps
    interval: int = 3  # optimizer steps between checks; authors: 25 forward calls ~ 3 steps
    stage2_at: Union[float, int, None] = 0.25  # truncate to r and freeze: fraction of training, step, or None
    default_capacity: float = 0.5  # capacity when LowRankConfig.capacity is None: floor(min(in, out) / 2)

    def check(self) -> None:
        self.require_positive_int("initial_rank")
        v = self.buffer
        self.require(
            "buffer",
            (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, float) and 0 <= v < 1),
            "give an int >= 0 or a float in [0, 1) (fraction of the capacity)",
        )
        self.require_fraction("threshold")
        self.require_positive_int("warmup_steps", zero_ok=True)
        self.require_positive_int("interval")
        v = self.stage2_at
        self.require(
            "stage2_at",
            v is None
            or (isinstance(v, float) and 0 <= v <= 1)
            or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
            "give a fraction of training in [0, 1], a step (int >= 0), or None for no stage 2",
        )
        self.require_fraction("default_capacity")


PRESETS: dict[str, dict[str, Any]] = {
    # The authors' public code for GPT-2 (MLP layers only, 8 micro-batches per optimizer step).
    "authors": {
        "target_modules": ["c_fc", "c_proj"],
        "exclude_modules": r".*attn.*",
        "mode": "factorized",
        "init": "kaiming",
        "strategy": "inrank",
        "strategy_args": {"initial_rank": 2, "buffer": 100, "threshold": 0.9, "warmup_steps": 25, "interval": 3},
    },
    # What this library's README and benchmarks run at small scale.
    "small": {
        "target_modules": ["c_fc", "c_proj"],
        "exclude_modules": r".*attn.*",
        "mode": "factorized",
        "strategy": "inrank",
        "strategy_args": {},
    },
}


class InRank(RankStrategy):
    """Incremental rank growth by the explained-ratio test, then a truncation to the found ranks."""

    name = "inrank"
    changes_shapes = True
    Args = InRankArgs

    def __init__(self, config):
        super().__init__(config)
        self.ranks: dict[str, int] = {}  # r per layer (the forward uses r + buffer)
        self.buffers: dict[str, int] = {}
        self.frozen = False

    def _sizes(self, name: str, layer: LowRankLinear) -> tuple[int, int]:
        """(capacity, buffer) of a layer: the allocated one if it has factors, else from the settings."""
        c = self.config
        capacity = layer.capacity or resolve_size(
            c.capacity if c.capacity is not None else self.args.default_capacity,
            layer.in_features, layer.out_features, "capacity", name,
        )
        b = self.args.buffer
        buffer = math.floor(b * capacity) if isinstance(b, float) else b
        return capacity, min(buffer, capacity - 1)

    def initial_spec(self, name: str, layer: LowRankLinear) -> LayerSpec:
        if self.config.mode == "dense":
            raise ValueError("LowRankConfig.mode='dense' does not fit strategy 'inrank'; use 'factorized' or 'residual'.")
        capacity, buffer = self._sizes(name, layer)
        r = min(self.args.initial_rank, capacity - buffer)
        self.ranks[name], self.buffers[name] = r, buffer
        scaling = 1.0 if self.config.alpha is None else self.config.alpha / (r + buffer)
        return LayerSpec(self.config.mode, r + buffer, capacity, scaling)

    def bind(self, context) -> None:
        super().bind(context)
        a = self.args
        self.stage2_step = None if a.stage2_at is None else self.fraction_to_step(a.stage2_at, "stage2_at")

    def due(self, step: int) -> bool:
        if self.frozen:
            return False
        a = self.args
        return step == self.stage2_step or (step >= a.warmup_steps and (step - a.warmup_steps) % a.interval == 0)

    def step(self, step: int, layers: dict[str, LowRankLinear]) -> Plan | None:
        if not self.due(step):
            return None
        if step == self.stage2_step:
            self.frozen = True
            return Plan(
                [LayerChange(n, "truncate", rank=self.ranks[n]) for n in layers if n in self.ranks],
                reason=f"InRank stage 2 at step {step}: truncate to the found ranks, drop the buffer",
            )
        changes = []
        for name, layer in layers.items():
            if name not in self.ranks:  # a layer InRank did not lay out (loaded, or imported from PEFT)
                _, buffer = self._sizes(name, layer)
                self.buffers[name] = min(buffer, layer.capacity - layer.rank)
                self.ranks[name] = layer.rank
            r, b, cap = self.ranks[name], self.buffers[name], layer.capacity
            s = self.singular_values(name, layer)
            if s is None:
                continue
            new_r = max(r, min(first_rank_above(s, self.args.threshold, r, min(r + b, cap - b)), cap - b))
            self.ranks[name] = new_r
            if min(new_r + b, cap) > layer.rank:
                changes.append(LayerChange(name, "grow", rank=min(new_r + b, cap)))
        return Plan(changes, reason=f"InRank growth check at step {step}") if changes else None

    def is_final(self) -> bool:
        return self.frozen

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": dict(self.ranks), "buffers": dict(self.buffers), "frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranks = dict(state["ranks"])
        self.buffers = dict(state["buffers"])
        self.frozen = bool(state["frozen"])
