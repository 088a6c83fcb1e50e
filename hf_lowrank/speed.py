"""Two models timed side by side on one batch, so that the machine's load cancels out of their ratio.

Tokens/s of two runs made one after the other compare the machine at two moments as much as
the two layouts. Here each round runs one forward+backward step of every model on the same
batch, in alternating order, and the speed ratio is the median over the rounds of the ratio
within each round: load that comes and goes hits both steps of a round alike. The FLOPs of
one such step come from ``torch.utils.flop_counter.FlopCounterMode``, which counts what the
step actually runs.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _step(model: nn.Module, batch: dict[str, torch.Tensor], autocast: torch.dtype | None) -> None:
    device = next(model.parameters()).device
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward+backward step of ``model`` on ``batch``."""
    counter = FlopCounterMode(display=False)
    with counter:
        _step(model, batch, None)
    return counter.get_total_flops()


def alternating_times(steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each ``steps`` function, one call each a round, alternating order.

    ``warmup`` untimed rounds first (allocations, kernel selection); then ``rounds`` rounds,
    every other one in reverse order, so no function always runs first.
    """
    order = list(steps)
    for _ in range(warmup):
        for name in order:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in order}
    for i in range(rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_times(
    models: dict[str, nn.Module], batch: dict[str, torch.Tensor], steps: int, autocast: torch.dtype | None = None
) -> dict[str, list[float]]:
    """Seconds of each forward+backward step of each model, the models alternating on ``batch`` (:func:`alternating_times`)."""
    for model in models.values():
        model.train()
    return alternating_times({name: functools.partial(_step, m, batch, autocast) for name, m in models.items()}, steps)


def compare_speed(
    low: nn.Module, full: nn.Module, batch: dict[str, torch.Tensor], steps: int, autocast: torch.dtype | None = None
) -> dict[str, Any]:
    """Speed of ``low`` over ``full`` measured side by side: step time ratio (interleaved) and FLOP ratio.

    The speedup is the median over rounds of ``full / low`` within a round: the two steps of a
    round run back to back, so load that drifts over seconds cancels in each ratio (on a busy
    2-core machine this spread less over repeats than the ratio of the two medians).
    """
    times = interleaved_times({"low": low, "full": full}, batch, steps, autocast)
    flops = {"low": step_flops(low, batch), "full": step_flops(full, batch)}
    return {
        "step_speedup": statistics.median(f / t for t, f in zip(times["low"], times["full"])),
        "flop_speedup": flops["full"] / max(flops["low"], 1),
        "step_seconds": {name: statistics.median(t) for name, t in times.items()},
        "step_flops": flops,
        "speed_steps": steps,
    }
