"""InRank (Zhao et al., 2023): ranks grow by an explained-variance test, then freeze.

Stage 1: every ``interval`` optimizer steps after ``warmup_steps``, each layer's active product
``B[:, :r+b] A[:r+b]`` is tested; the rank ``r`` rises to the first ``k`` whose explained
ratio (over all ``min(in, out)`` singular values, as the authors compute it) exceeds
``threshold``, never shrinking and capped at ``capacity - buffer``, and the forward keeps
using ``r + buffer`` components. Stage 2 (InRank-Efficient): at ``stage2_at`` every layer is
SVD-truncated to ``r``, the buffer is dropped, and ranks stay fixed.

``LowRankConfig.mode`` picks the variant: ``"factorized"`` is InRank-Efficient (the authors'
code), ``"residual"`` the paper's original ``W = W0 + B A`` over a frozen base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from ..checks import check_choice, fail, is_int, resolve_size
from ..layer import LayerSpec, LowRankLinear
from ..spectral import first_rank_above
from .base import LayerChange, Plan, RankStrategy, StateContext, StateFields, StrategyArgs, TrainContext

# The authors' GPT-2 small run, in optimizer steps (their configs count forward calls of a layer,
# 8 per step: 8 micro-batches of 8 sequences on each of 8 GPUs make the global batch of 512):
# checks from forward call 200 (step 25) every 25 calls (3.125 steps), stage 1 ends after 130 steps
# (``max_steps: 130``), and training runs 100 epochs of about 225 steps, 22,500 in all.
AUTHORS_STEPS, AUTHORS_STAGE2, AUTHORS_WARMUP, AUTHORS_INTERVAL = 22_500, 130, 25, 3
STAGE2_DEFAULT = 0.25  # our choice: stage 1 long enough to see ranks settle in short runs

MIN_CHECKS = 3  # fewer growth checks than this before stage 2 can act, but barely: warn


@dataclass
class InRankArgs(StrategyArgs):
    """InRank settings. Schedule points: an int is an optimizer step, a float a fraction of training.

    The warm-up and interval defaults keep the authors' proportions (25 and 3 steps of a
    130-step stage 1) at the default ``stage2_at``, so they scale with the run's length.
    ``PRESETS["authors"]`` is the authors' GPT-2 schedule itself.
    """

    initial_rank: int = 2  # r0, the authors' default
    buffer: Union[int, float] = 0.25  # b; authors: 100 (for d=768). A float is a fraction of the capacity, floored.
    threshold: float = 0.9  # alpha of the explained-ratio test; authors: 0.9 (0.8 in an ablation)
    warmup_steps: Union[int, float] = STAGE2_DEFAULT * AUTHORS_WARMUP / AUTHORS_STAGE2  # first check; ~0.048 of training
    interval: Union[int, float] = STAGE2_DEFAULT * AUTHORS_INTERVAL / AUTHORS_STAGE2  # between checks; ~0.0058, at least 1 step
    stage2_at: Union[float, int, None] = STAGE2_DEFAULT  # truncate to r and freeze: fraction of training, step, or None
    default_capacity: float = 0.5  # capacity when LowRankConfig.capacity is None: floor(min(in, out) / 2), the authors'
    inactive_init: str = "zero"  # components beyond r + b: "zero" (B = 0, growth is exact) or "random" (the authors')

    def check(self) -> None:
        self.require_positive_int("initial_rank")
        v = self.buffer
        self.require(
            "buffer",
            (is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v < 1),
            "give an int >= 0 or a float in [0, 1) (fraction of the capacity)",
        )
        self.require_fraction("threshold")
        v = self.warmup_steps
        self.require(
            "warmup_steps",
            (is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
            "give a step (int >= 0) or a fraction of training in [0, 1]",
        )
        v = self.interval
        self.require(
            "interval",
            (is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
            "give a number of steps (int >= 1) or a fraction of training in (0, 1]",
        )
        v = self.stage2_at
        self.require(
            "stage2_at",
            v is None or (isinstance(v, float) and 0 < v <= 1) or (is_int(v) and v >= 1),
            "give a fraction of training in (0, 1], a step >= 1, or None for no stage 2 (step 0 never comes)",
        )
        self.require_fraction("default_capacity")
        check_choice(self.field_name("inactive_init"), self.inactive_init, ("zero", "random"))


PRESETS: dict[str, dict[str, Any]] = {
    # The authors' public code for GPT-2 small: MLP layers only, r0 2, b 100, alpha 0.9, and their
    # schedule as fractions of training (checks from step 25 every 3, stage 2 at step 130, of
    # 22,500), which keeps it where it was in tokens seen for another batch size or run length.
    "authors": {
        "target_modules": ["c_fc", "c_proj"],
        "exclude_modules": r".*attn.*",
        "mode": "factorized",
        "init": "kaiming",
        "strategy": "inrank",
        "strategy_args": {
            "initial_rank": 2,
            "buffer": 100,
            "threshold": 0.9,
            "warmup_steps": AUTHORS_WARMUP / AUTHORS_STEPS,
            "interval": AUTHORS_INTERVAL / AUTHORS_STEPS,
            "stage2_at": AUTHORS_STAGE2 / AUTHORS_STEPS,
            "inactive_init": "random",
        },
    },
}


class InRank(RankStrategy):
    """Incremental rank growth by the explained-ratio test, then a truncation to the found ranks.

    ``bind`` refuses a schedule under which the strategy could do nothing (no growth check
    before stage 2 or the end, a stage 2 at step 0) and warns when it can act only barely
    (fewer than ``MIN_CHECKS`` growth checks, or stage 2 at the last step, after which the
    truncated model never trains).
    """

    name = "inrank"
    changes_shapes = True
    Args = InRankArgs
    modes = ("factorized", "residual")
    modes_why = "grows factor ranks, so its layers start factorized (W = B A) or residual (W0 + s B A)"
    ignores = {
        "rank": "ranks start at strategy_args.initial_rank and grow by its test, up to LowRankConfig.capacity "
        "(default half of min(in, out)); bound them with capacity",
    }

    def __init__(self, config):
        super().__init__(config)
        self.ranks: dict[str, int] = {}  # r per layer (the forward uses r + buffer)
        self.buffers: dict[str, int] = {}
        self.frozen = False
        self.zero_inactive = self.args.inactive_init == "zero"  # how LowRankModel initialises the factors
        self.stage2_step: int | None = None
        self.warmup: int = 0
        self.every: int = 1

    def _capacity_and_buffer(self, name: str, layer: LowRankLinear) -> tuple[int, int]:
        """(capacity, buffer) of a layer: the allocated one if it has factors, else from the settings.

        Both are floored, as the authors size ``int(min(in, out) / 2)``: a capacity of 33 and a
        buffer of 0.25 give 8 components, never 9.
        """
        c = self.config
        capacity = layer.capacity or resolve_size(
            c.capacity if c.capacity is not None else self.args.default_capacity,
            layer.in_features, layer.out_features, "capacity", name,
        )
        b = self.args.buffer
        buffer = math.floor(b * capacity + 1e-9) if isinstance(b, float) else b  # 1e-9: 0.29 * 100 is 28.999...
        return capacity, min(buffer, capacity - 1)

    def initial_spec(self, name: str, layer: LowRankLinear) -> LayerSpec:
        mode = self.config.mode
        if mode == "residual" and not self.zero_inactive:
            fail(
                self.args.field_name("inactive_init"), "random",
                "random inactive components are the InRank-Efficient layout; use mode='factorized', or 'zero' in residual mode",
            )
        capacity, buffer = self._capacity_and_buffer(name, layer)
        r = min(self.args.initial_rank, capacity - buffer)
        if r < self.args.initial_rank:
            self.warn(
                f"inrank: strategy_args.initial_rank={self.args.initial_rank} does not fit layer {name!r} "
                f"(capacity {capacity} - buffer {buffer} = {capacity - buffer}); it starts at rank {r}."
            )
        self.ranks[name], self.buffers[name] = r, buffer
        scaling = 1.0 if self.config.alpha is None else self.config.alpha / (r + buffer)
        return LayerSpec(mode, r + buffer, capacity, scaling)

    def bind(self, context: TrainContext) -> None:
        super().bind(context)
        a, max_steps = self.args, context.max_steps
        self.stage2_step = None if a.stage2_at is None else self.fraction_to_step(a.stage2_at, "stage2_at")
        if self.stage2_step == 0:
            fail(
                a.field_name("stage2_at"), a.stage2_at,
                f"it is step 0 of max_steps={max_steps}, which never comes, so stage 2 would never run; "
                f"give a fraction >= {1 / max_steps:.3g}, a step >= 1, or None for no stage 2",
            )
        self.warmup = round(a.warmup_steps * max_steps) if isinstance(a.warmup_steps, float) else a.warmup_steps
        self.every = max(1, round(a.interval * max_steps)) if isinstance(a.interval, float) else a.interval
        if self.frozen:
            return
        first = self.warmup if self.warmup >= 1 else self.every  # step 0 never comes
        last = max_steps if self.stage2_step is None else self.stage2_step - 1  # at stage 2 the truncation wins
        where = "the end of training" if self.stage2_step is None else f"stage 2 at step {self.stage2_step}"
        if first > last:
            field = "warmup_steps" if self.warmup >= 1 else "interval"
            fail(
                a.field_name(field), getattr(a, field),
                f"the first growth check would be at step {first}, after {where} (max_steps={max_steps}), so ranks "
                f"would never grow; give a smaller {field} (e.g. a fraction of training such as "
                f"{InRankArgs.warmup_steps if field == 'warmup_steps' else InRankArgs.interval:.3g}) or move stage2_at later",
            )
        checks = (last - first) // self.every + 1
        if checks < MIN_CHECKS:
            self.warn(
                f"inrank: only {checks} growth check(s) (steps {first}-{last}, every {self.every}) before {where}; "
                "ranks can barely grow. Lower strategy_args.warmup_steps or interval, or move stage2_at later."
            )
        self.warn_if_last_step(self.stage2_step, "stage 2", "the truncated model is never trained", "Move strategy_args.stage2_at earlier")

    def due(self, step: int) -> bool:
        if self.frozen:
            return False
        return step == self.stage2_step or (step >= self.warmup and (step - self.warmup) % self.every == 0)

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
                _, buffer = self._capacity_and_buffer(name, layer)
                self.buffers[name] = min(buffer, layer.capacity - layer.rank)
                self.ranks[name] = layer.rank
            r, b, cap = self.ranks[name], self.buffers[name], layer.capacity
            s = self.singular_values(name, layer)
            if s is None:
                continue
            found = first_rank_above(s, self.args.threshold, r, min(r + b, cap - b), length=layer.full_rank)
            new_r = max(r, min(found, cap - b))
            self.ranks[name] = new_r
            if min(new_r + b, cap) > layer.rank:
                changes.append(LayerChange(name, "grow", rank=min(new_r + b, cap)))
        return Plan(changes, reason=f"InRank growth check at step {step}") if changes else None

    def is_final(self) -> bool:
        return self.frozen

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": dict(self.ranks), "buffers": dict(self.buffers), "frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.ranks = dict(state["ranks"])
        self.buffers = dict(state["buffers"])
        self.frozen = state["frozen"]

    def check_state(self, state: Any, ctx: StateContext | None = None) -> None:
        f = StateFields(state, ("ranks", "buffers", "frozen"), ctx)
        frozen = f.bool("frozen")
        ranks, buffers = f.layer_map("ranks"), f.layer_map("buffers")
        if set(ranks) != set(buffers):
            fail("strategy_state.buffers", sorted(set(ranks) ^ set(buffers))[:3], "ranks and buffers name the same layers")
        if ctx is not None and ranks and set(ranks) != set(ctx.layers):
            fail("strategy_state.ranks", sorted(set(ctx.layers) - set(ranks))[:3], "every low-rank layer has a rank once InRank laid them out; these are missing")
        for name in ranks:
            layer = ctx.layers[name] if ctx is not None else None
            cap = (layer.capacity or layer.full_rank) if layer is not None else None
            r = f.int("ranks", 1, cap, ranks[name], f"strategy_state.ranks[{name!r}]")
            f.int("buffers", 0, cap, buffers[name], f"strategy_state.buffers[{name!r}]")
            if cap is not None and not frozen and r + buffers[name] > cap:
                fail(f"strategy_state.buffers[{name!r}]", buffers[name], f"rank {r} + buffer must fit the layer's capacity {cap}")
