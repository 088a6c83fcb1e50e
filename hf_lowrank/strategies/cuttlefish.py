"""Cuttlefish (Wang et al., MLSys 2023): dense until every layer's stable rank has converged.

Phase 1 trains dense and records each layer's stable rank every ``measure_every`` optimizer
steps. A layer is stable once its stable-rank curve flattens (EMA, gradient, threshold, made
easier as fewer layers remain). When every layer is stable, each goes dense -> factorized at
its scaled stable rank by the balanced SVD split, except the layers a measurement shows do
not get faster (and, optionally, the first blocks): they stay dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..layer import LayerSpec, LowRankLinear
from ..profiling import profile_layer
from ..spectral import scaled_stable_rank, stable_rank
from .base import LayerChange, Plan, RankStrategy, StrategyArgs


@dataclass
class CuttlefishArgs(StrategyArgs):
    """Cuttlefish settings. Detector defaults are the authors' DeiT ones."""

    measure_every: int = 10  # optimizer steps between stable-rank measurements (the paper: once per epoch)
    window: int = 5  # w: EMA span and minimum number of measurements (DeiT: 5; CIFAR: 15)
    mean_over: int = 5  # m: how many of the last EMA gradients are averaged (DeiT: 5; CIFAR: 11)
    tau: float = 0.411  # convergence threshold on mean |d ema / d measurement| (DeiT: 0.411; CIFAR: 0.1)
    relax_few: float = 2.5  # tau multiplier when few layers remain unstable (the authors' code)
    relax_last: float = 5.0  # tau multiplier when one or very few remain (the authors' code)
    few_fraction: float = 0.25  # "few" = at most this fraction of tracked layers unstable (our reading)
    last_fraction: float = 0.1  # "very few" = at most this fraction, or a single layer (our reading)
    floor_fraction: float = 0.0  # rank floor as a fraction of full rank (DeiT 0.5, ResNet-50 0.2, CIFAR none)
    max_dense_steps: Union[float, int] = 0.5  # switch at this point even if not all layers converged (our choice)
    factorized_lr_decay: float = 3.0  # learning rate divided by this at the switch (DeiT: 3.0)
    rewarm_steps: int = 0  # > 0: re-warm the learning rate over this many steps instead of dividing
    select_layers: str = "measured"  # "measured": keep dense the layers that do not get faster; "all"
    min_speedup: float = 1.0  # a layer is factorized only if dense / factorized time >= this
    keep_first_blocks: int = 0  # also keep the first K transformer blocks dense (the authors' K)
    profile_repeats: int = 5  # timed repetitions per profiled shape (median is used)

    def check(self) -> None:
        for name in ("measure_every", "window", "mean_over", "profile_repeats"):
            self.require_positive_int(name)
        self.require_positive_int("keep_first_blocks", zero_ok=True)
        self.require_positive_int("rewarm_steps", zero_ok=True)
        for name in ("tau", "relax_few", "relax_last", "factorized_lr_decay", "min_speedup"):
            self.require_positive(name)
        for name in ("few_fraction", "last_fraction"):
            self.require_fraction(name)
        self.require_fraction("floor_fraction", low_open=False)
        v = self.max_dense_steps
        self.require(
            "max_dense_steps",
            (isinstance(v, float) and 0 < v <= 1) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            "give a fraction of training in (0, 1] or a step >= 1",
        )
        self.require("select_layers", self.select_layers in ("measured", "all"), "choose 'measured' or 'all'")


def converged(stable_ranks: list[float], window: int, mean_over: int, tau: float) -> bool:
    """The Cuttlefish detector on one layer's stable-rank sequence.

    EMA with ``a = 2 / (window + 1)``; ``g = |gradient(ema)|``; converged once there are at
    least ``window`` measurements and ``mean(g[-mean_over:]) <= tau``.
    """
    if len(stable_ranks) < max(window, 2):
        return False
    a = 2.0 / (window + 1)
    ema = [float(stable_ranks[0])]
    for x in stable_ranks[1:]:
        ema.append(a * float(x) + (1 - a) * ema[-1])
    g = np.abs(np.gradient(np.asarray(ema)))
    return float(g[-mean_over:].mean()) <= tau


def block_index(name: str) -> int | None:
    """The transformer block a layer belongs to: the first number in its dotted name."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


class Cuttlefish(RankStrategy):
    """Dense warm-up until stable ranks converge, then factorize at scaled stable ranks."""

    name = "cuttlefish"
    Args = CuttlefishArgs

    def __init__(self, config):
        super().__init__(config)
        self.xi: dict[str, float] = {}  # full_rank / srank(W at init), stored once per layer
        self.history: dict[str, list[int]] = {}  # stable rank per measurement
        self.stable: dict[str, bool] = {}
        self.switched = False
        self.decisions: list[dict[str, Any]] = []

    def initial_spec(self, name: str, layer: LowRankLinear) -> LayerSpec:
        s = self.singular_values(name, layer)
        srank = stable_rank(s) if s is not None else 0
        self.xi[name] = layer.full_rank / max(1, srank)
        return LayerSpec("dense")

    def bind(self, context) -> None:
        super().bind(context)
        self.deadline = self.fraction_to_step(self.args.max_dense_steps, "max_dense_steps")

    def due(self, step: int) -> bool:
        return not self.switched and (step % self.args.measure_every == 0 or step >= self.deadline)

    def tau_effective(self) -> float:
        """tau, relaxed as fewer layers remain unstable."""
        a = self.args
        total = max(1, len(self.stable))
        left = sum(not v for v in self.stable.values())
        if left <= 1 or left <= a.last_fraction * total:
            return a.tau * a.relax_last
        if left <= a.few_fraction * total:
            return a.tau * a.relax_few
        return a.tau

    def step(self, step: int, layers: dict[str, LowRankLinear]) -> Plan | None:
        if not self.due(step):
            return None
        spectra = {}
        if step % self.args.measure_every == 0:
            for name, layer in layers.items():
                s = self.singular_values(name, layer)
                if s is None:
                    continue
                spectra[name] = s
                self.history.setdefault(name, []).append(stable_rank(s))
                self.stable.setdefault(name, False)
            tau = self.tau_effective()
            for name, ranks in self.history.items():
                if not self.stable[name]:
                    self.stable[name] = converged(ranks, self.args.window, self.args.mean_over, tau)
        all_stable = bool(self.stable) and all(self.stable.values())
        if not (all_stable or step >= self.deadline):
            return None
        return self._switch(step, layers, spectra, "all stable ranks converged" if all_stable else "dense-phase deadline")

    def _switch(self, step: int, layers: dict[str, LowRankLinear], spectra: dict, why: str) -> Plan:
        a, ctx = self.args, self.context
        self.switched = True
        changes, cache = [], {}
        for name, layer in layers.items():
            s = spectra.get(name)
            if s is None:
                s = self.singular_values(name, layer)
            if s is None:
                self.decisions.append({"layer": name, "kept_dense": True, "why": "spectrum not available"})
                continue
            xi = self.xi.get(name, 1.0)
            rank = scaled_stable_rank(s, xi, layer.full_rank, a.floor_fraction)
            row: dict[str, Any] = {"layer": name, "rank": rank, "full_rank": layer.full_rank}
            block = block_index(name)
            if rank >= layer.full_rank or rank * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features:
                row.update(kept_dense=True, why="the factorization would not be smaller")
            elif block is not None and block < a.keep_first_blocks:
                row.update(kept_dense=True, why=f"block {block} < keep_first_blocks={a.keep_first_blocks}")
            elif a.select_layers == "measured":
                shape = (layer.in_features, layer.out_features, rank)
                if shape not in cache:
                    cache[shape] = profile_layer(*shape, tokens=ctx.tokens_per_batch, device=ctx.device, dtype=ctx.dtype, repeats=a.profile_repeats)
                row.update(cache[shape])
                fast = cache[shape]["speedup"] >= a.min_speedup
                row.update(kept_dense=not fast, why=f"measured speedup {cache[shape]['speedup']:.2f}x vs min_speedup {a.min_speedup}")
            else:
                row.update(kept_dense=False, why="select_layers='all'")
            if not row["kept_dense"]:
                changes.append(LayerChange(name, "to_factorized", rank=rank, capacity=rank))
            self.decisions.append(row)
        lr_factor = 1.0 if a.rewarm_steps else 1.0 / a.factorized_lr_decay
        return Plan(changes, lr_factor=lr_factor, rewarm_steps=a.rewarm_steps, reason=f"cuttlefish switch at step {step}: {why}")

    def report(self) -> list[dict[str, Any]]:
        """Per-layer switch decisions: rank, measured times, kept dense and why."""
        return list(self.decisions)

    def is_final(self) -> bool:
        return self.switched

    def state_dict(self) -> dict[str, Any]:
        return {
            "xi": dict(self.xi),
            "history": {k: list(v) for k, v in self.history.items()},
            "stable": dict(self.stable),
            "switched": self.switched,
            "decisions": self.decisions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.xi = dict(state["xi"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.stable = dict(state["stable"])
        self.switched = bool(state["switched"])
        self.decisions = list(state["decisions"])
