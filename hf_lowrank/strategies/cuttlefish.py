"""Cuttlefish (Wang et al., MLSys 2023): dense until every layer's stable rank has converged.

Phase 1 trains dense and records each layer's stable rank every ``measure_every`` optimizer
steps. A layer is stable once its stable-rank curve flattens (EMA, gradient, threshold, made
easier when few layers remain unstable, counted as the authors' scripts count them:
:class:`ConvergenceDetector`). When every layer is stable (or
at the optional deadline), each layer goes dense -> factorized at its scaled stable rank by
the balanced SVD split, except the layers a measurement shows do not get faster (and,
optionally, the first blocks): they stay dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..checks import fail
from ..layer import LayerSpec, LowRankLinear
from ..profiling import profile_layer
from ..spectral import scaled_stable_rank, stable_rank
from .base import LayerChange, Plan, RankStrategy, StateContext, StateFields, StrategyArgs, TrainContext


@dataclass
class CuttlefishArgs(StrategyArgs):
    """Cuttlefish settings. The detector defaults are the authors' DeiT ones (a transformer)."""

    measure_every: int = 10  # optimizer steps between stable-rank measurements; the paper: once per epoch (our choice for LMs)
    window: int = 5  # w: EMA span; a layer needs more than w measurements after init (the authors' DeiT: 5; CIFAR: 15)
    mean_over: int = 5  # m: how many of the last |EMA gradient| values are averaged (DeiT: 5; CIFAR: 11)
    tau: float = 0.411  # convergence threshold on mean |d EMA / d measurement| (DeiT: 0.411; CIFAR: 0.1; ResNet-50: 0.33)
    relax_few: float = 2.5  # tau multiplier when at most few_layers remain unstable (the authors: x2.5)
    relax_last: float = 5.0  # tau multiplier when at most last_layers remain unstable (the authors: x5)
    few_layers: int = 9  # the authors' DeiT script: x2.5 with 5-9 layers unstable (ResNet-50: 6; CIFAR: 2)
    last_layers: int = 4  # the authors' DeiT script: x5 with 0-4 layers unstable (ResNet-50: 3; CIFAR: 1)
    history_from_init: bool = True  # start each history with the stable rank at init (DeiT, ResNet-50; CIFAR: False)
    floor_fraction: float = 0.0  # rank floor as a fraction of full rank (DeiT 0.5, ResNet-50 0.2, CIFAR none)
    max_dense_steps: Union[float, int, None] = 0.5  # switch here even if not all layers converged; None: no deadline (our choice)
    factorized_lr_decay: float = 3.0  # learning rate divided by this at the switch (the authors' DeiT: 3.0)
    rewarm_steps: int = 0  # > 0: re-warm the learning rate over this many steps instead of dividing it
    select_layers: str = "measured"  # "measured": keep dense the layers not measured faster; "all": factorize all
    min_speedup: float = 1.05  # factorize only if dense / factorized time >= this (our choice: a margin over timing noise)
    keep_first_blocks: int = 0  # also keep the first K blocks dense (the authors keep K early blocks; 0 = let timing decide)
    profile_repeats: int = 5  # timed repetitions per profiled shape; the median is used (our choice)

    def check(self) -> None:
        for name in ("measure_every", "window", "mean_over", "profile_repeats"):
            self.require_positive_int(name)
        self.require_positive_int("keep_first_blocks", zero_ok=True)
        self.require_positive_int("rewarm_steps", zero_ok=True)
        for name in ("tau", "relax_few", "relax_last", "factorized_lr_decay", "min_speedup"):
            self.require_positive(name)
        for name in ("relax_few", "relax_last"):
            self.require(name, getattr(self, name) >= 1, "give a number >= 1 (tau is relaxed, never tightened)")
        for name in ("few_layers", "last_layers"):
            self.require_positive_int(name, zero_ok=True)
        self.require("last_layers", self.last_layers <= self.few_layers, f"give at most few_layers={self.few_layers!r}")
        self.require("history_from_init", isinstance(self.history_from_init, bool), "give true or false")
        self.require_fraction("floor_fraction", low_open=False)
        v = self.max_dense_steps
        self.require(
            "max_dense_steps",
            v is None or (isinstance(v, float) and 0 < v <= 1) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            "give a fraction of training in (0, 1], a step >= 1, or None for no deadline",
        )
        self.require("select_layers", self.select_layers in ("measured", "all"), "choose 'measured' or 'all'")


def converged(stable_ranks: list[float], window: int, mean_over: int, tau: float, initial: bool = False) -> bool:
    """The Cuttlefish test on one layer's stable-rank sequence.

    EMA with ``a = 2 / (window + 1)``; ``g = |numpy.gradient(ema)|``; converged once more than
    ``window`` measurements were taken after init (the authors skip epochs ``epoch < window``,
    counting from 0) and ``mean(g[-mean_over:]) <= tau``. ``initial`` says the sequence starts
    with the stable rank at init, which enters the EMA but is not a measurement.
    """
    if len(stable_ranks) - int(initial) <= window or len(stable_ranks) < 2:
        return False
    a = 2.0 / (window + 1)
    ema = [float(stable_ranks[0])]
    for x in stable_ranks[1:]:
        ema.append(a * float(x) + (1 - a) * ema[-1])
    g = np.abs(np.gradient(np.asarray(ema)))
    return float(g[-mean_over:].mean()) <= tau


class ConvergenceDetector:
    """Per-layer stable-rank histories and sticky stability, with tau relaxed as layers settle.

    ``tau_eff`` is fixed for one measurement round from the number of tracked layers still
    unstable before the round, as absolute counts, as in the authors' scripts: ``tau *
    relax_last`` with at most ``last_layers`` unstable, ``tau * relax_few`` with at most
    ``few_layers``, else ``tau``. A model with few tracked layers is therefore relaxed from
    the first round, as the authors' rule would relax it.
    """

    def __init__(self, window: int, mean_over: int, tau: float, relax_few: float = 2.5, relax_last: float = 5.0,
                 few_layers: int = 9, last_layers: int = 4):
        self.window, self.mean_over, self.tau = window, mean_over, tau
        self.relax_few, self.relax_last = relax_few, relax_last
        self.few_layers, self.last_layers = few_layers, last_layers
        self.history: dict[str, list[float]] = {}
        self.stable: dict[str, bool] = {}
        self.initial: set[str] = set()  # layers whose history starts with the stable rank at init

    def start(self, name: str, value: float) -> None:
        """Track ``name`` from its stable rank at init (the first EMA point, not a measurement)."""
        self.history[name] = [value]
        self.stable[name] = False
        self.initial.add(name)

    def tau_effective(self) -> float:
        """The threshold for the next round, from how many tracked layers are still unstable."""
        left = sum(not v for v in self.stable.values())
        if left <= self.last_layers:
            return self.tau * self.relax_last
        if left <= self.few_layers:
            return self.tau * self.relax_few
        return self.tau

    def update(self, measurements: dict[str, float]) -> list[str]:
        """Record one round of stable ranks; returns the layers that became stable in it."""
        for name, value in measurements.items():
            self.history.setdefault(name, []).append(value)
            self.stable.setdefault(name, False)
        tau = self.tau_effective()
        newly = [
            name for name in measurements
            if not self.stable[name]
            and converged(self.history[name], self.window, self.mean_over, tau, initial=name in self.initial)
        ]
        for name in newly:
            self.stable[name] = True
        return newly

    def all_stable(self) -> bool:
        """True once at least one layer is tracked and every tracked layer is stable."""
        return bool(self.stable) and all(self.stable.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "stable": dict(self.stable),
            "initial": sorted(self.initial),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.stable = {k: bool(v) for k, v in state["stable"].items()}
        self.initial = set(state["initial"])


def block_index(name: str) -> int | None:
    """The block a layer belongs to: the first integer component of its dotted name.

    ``transformer.h.3.mlp.c_fc`` -> 3, ``model.layers.12.self_attn.q_proj`` -> 12,
    ``bert.encoder.layer.0.output.dense`` -> 0; None when the name has no integer component.
    """
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


class Cuttlefish(RankStrategy):
    """Dense until stable ranks converge, then factorize at scaled stable ranks where it pays."""

    name = "cuttlefish"
    changes_shapes = True
    modes = ("dense", "factorized")
    modes_why = (
        "starts every layer dense and factorizes (W = B A) the layers that get faster once their stable ranks converge; it has no residual phase (for adapters over frozen pretrained weights use strategy 'inrank' or "
        "'fixed' with mode='residual')"
    )
    ignores = {
        "rank": "each layer's rank is its stable rank when the ranks converge, scaled as at init (floor: strategy_args.floor_fraction)",
        "capacity": "the factors are allocated at the rank it chooses",
        "init": "the factors come from the SVD of the trained dense weight",
        "init_scale": "the factors come from the SVD of the trained dense weight",
    }
    Args = CuttlefishArgs

    def __init__(self, config):
        super().__init__(config)
        a = self.args
        self.detector = ConvergenceDetector(
            a.window, a.mean_over, a.tau, a.relax_few, a.relax_last, a.few_layers, a.last_layers
        )
        self.xi: dict[str, float] = {}  # full_rank / srank(W at init), stored once per layer
        self.switched_at: int | None = None
        self.decisions: list[dict[str, Any]] = []
        self.deadline: int | None = None

    def initial_spec(self, name: str, layer: LowRankLinear) -> LayerSpec:
        self._store_xi(name, layer)
        return LayerSpec("dense")

    def _store_xi(self, name: str, layer: LowRankLinear) -> None:
        """``xi = full_rank / srank(W)`` from the layer as it is now (and, with
        ``history_from_init``, the first point of its history), unless already stored."""
        if name in self.xi:
            return
        s = self.singular_values(name, layer)
        if s is not None:
            self.xi[name] = layer.full_rank / max(1, stable_rank(s))
            if self.args.history_from_init:
                self.detector.start(name, stable_rank(s))

    def bind(self, context: TrainContext) -> None:
        """Fix the deadline; refuse a schedule that never switches, warn when only the deadline can.

        The detector needs more than ``window`` measurements: with fewer before the deadline the
        switch comes at the deadline (a warning); with no deadline the run would stay dense (an error).
        """
        super().bind(context)
        a, max_steps = self.args, context.max_steps
        self.deadline = None if a.max_dense_steps is None else max(1, self.fraction_to_step(a.max_dense_steps, "max_dense_steps"))
        if self.switched_at is not None:
            return
        limit = max_steps if self.deadline is None else self.deadline
        measurements = limit // a.measure_every
        if measurements <= a.window:
            needed = f"the detector needs more than window={a.window}"
            if self.deadline is None:
                fail(
                    a.field_name("measure_every"), a.measure_every,
                    f"it gives {measurements} stable-rank measurement(s) in max_steps={max_steps} and {needed}, and "
                    f"max_dense_steps=None sets no deadline, so the layers would never be factorized; give "
                    f"measure_every <= {max(1, max_steps // (a.window + 1))}, a smaller window, or a deadline",
                )
            self.warn(
                f"cuttlefish: {measurements} stable-rank measurement(s) before the deadline at step {self.deadline} and "
                f"{needed}: the switch will come at the deadline, not from converged ranks. Lower "
                "strategy_args.measure_every or window, or move max_dense_steps later."
            )
        self.warn_if_last_step(
            self.deadline, "the dense-phase deadline",
            "if the ranks have not converged by then, the factorized model is never trained",
            "Move strategy_args.max_dense_steps earlier",
        )

    def due(self, step: int) -> bool:
        if self.switched_at is not None:
            return False
        return step % self.args.measure_every == 0 or (self.deadline is not None and step >= self.deadline)

    def step(self, step: int, layers: dict[str, LowRankLinear]) -> Plan | None:
        if not self.due(step):
            return None
        spectra = {}
        if step % self.args.measure_every == 0:
            for name, layer in layers.items():
                s = self.singular_values(name, layer)
                if s is None:
                    continue
                if name not in self.xi:  # wrapped from a saved layout: the first measurement stands in for init
                    self.xi[name] = layer.full_rank / max(1, stable_rank(s))
                spectra[name] = s
            self.detector.update({name: stable_rank(s) for name, s in spectra.items()})
        if self.detector.all_stable():
            return self._switch(step, layers, spectra, "every layer's stable rank converged")
        if self.deadline is not None and step >= self.deadline:
            return self._switch(step, layers, spectra, f"dense-phase deadline (max_dense_steps={self.args.max_dense_steps!r})")
        return None

    def _switch(self, step: int, layers: dict[str, LowRankLinear], spectra: dict, why: str) -> Plan:
        a, ctx = self.args, self.context
        self.switched_at = step
        changes, timings = [], {}
        for name, layer in layers.items():
            s = spectra[name] if name in spectra else self.singular_values(name, layer)
            if s is None:
                self.decisions.append({"layer": name, "kept_dense": True, "why": "spectrum not available"})
                continue
            rank = scaled_stable_rank(s, self.xi.get(name, 1.0), layer.full_rank, a.floor_fraction)
            row: dict[str, Any] = {
                "layer": name, "rank": rank, "full_rank": layer.full_rank,
                "stable_rank": stable_rank(s), "converged": self.detector.stable.get(name, False),
            }
            block = block_index(name)
            if rank * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features:
                row.update(kept_dense=True, why="the factors would not be smaller than the dense weight")
            elif block is not None and block < a.keep_first_blocks:
                row.update(kept_dense=True, why=f"block {block} < keep_first_blocks={a.keep_first_blocks}")
            elif a.select_layers == "measured":
                shape = (layer.in_features, layer.out_features, rank)
                if shape not in timings:  # each distinct shape is profiled once
                    timings[shape] = profile_layer(
                        *shape, tokens=ctx.tokens_per_batch, device=ctx.device, dtype=ctx.dtype, repeats=a.profile_repeats
                    )
                t = timings[shape]
                speedup = t["dense_s"] / max(t["factorized_s"], 1e-12)
                row.update(dense_s=t["dense_s"], factorized_s=t["factorized_s"], speedup=speedup)
                row.update(kept_dense=speedup < a.min_speedup, why=f"measured speedup {speedup:.2f}x vs min_speedup {a.min_speedup}")
            else:
                row.update(kept_dense=False, why="select_layers='all'")
            if not row["kept_dense"]:
                changes.append(LayerChange(name, "to_factorized", rank=rank, capacity=rank))
            self.decisions.append(row)
        reason = f"cuttlefish switch at step {step}: {why}; {len(changes)} of {len(layers)} layers factorized"
        if not changes:  # nothing changes, so the learning rate does not either
            return Plan([], reason=reason)
        if a.rewarm_steps:
            return Plan(changes, rewarm_steps=a.rewarm_steps, reason=reason)
        return Plan(changes, lr_factor=1.0 / a.factorized_lr_decay, reason=reason)

    def report(self) -> list[dict[str, Any]]:
        """Per-layer switch decisions: rank, measured times, kept dense and why (empty before the switch)."""
        return [dict(row) for row in self.decisions]

    def is_final(self) -> bool:
        return self.switched_at is not None

    def state_dict(self) -> dict[str, Any]:
        return {
            "xi": dict(self.xi),
            **self.detector.state_dict(),
            "switched_at": self.switched_at,
            "decisions": self.report(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.xi = {k: float(v) for k, v in state["xi"].items()}
        self.detector.load_state_dict(state)
        self.switched_at = state["switched_at"]
        self.decisions = [dict(row) for row in state["decisions"]]

    def check_state(self, state: Any, ctx: StateContext | None = None) -> None:
        f = StateFields(state, ("xi", "history", "stable", "initial", "switched_at", "decisions"), ctx)
        for name, value in f.layer_map("xi").items():
            f.number(value, f"strategy_state.xi[{name!r}]", 0.0)
        for name, values in f.layer_map("history").items():
            if not isinstance(values, list):
                fail(f"strategy_state.history[{name!r}]", values, "give a list of stable ranks")
            for value in values:
                f.number(value, f"strategy_state.history[{name!r}]", 0.0)
        for name, value in f.layer_map("stable").items():
            if not isinstance(value, bool):
                fail(f"strategy_state.stable[{name!r}]", value, "give true or false")
        if not isinstance(state["initial"], list):
            fail("strategy_state.initial", state["initial"], "give a list of layer names")
        f.layer_names("initial", state["initial"])
        switched = f.step("switched_at")
        decisions = state["decisions"]
        if not (isinstance(decisions, list) and all(isinstance(row, dict) and isinstance(row.get("layer"), str) for row in decisions)):
            fail("strategy_state.decisions", decisions, "give a list of per-layer decisions, each with its 'layer'")
        f.layer_names("decisions", [row["layer"] for row in decisions])
        if (switched is None) != (not decisions):
            fail("strategy_state.switched_at", switched, "the switch and its per-layer decisions come together: "
                 + ("decisions are recorded, so give the step of the switch" if decisions else "no decision is recorded, so give null"))
