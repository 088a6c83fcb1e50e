"""Measured cost of a layer, dense vs factorized, on the device and dtype training runs with."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

WARMUP = 2  # untimed runs first: kernel selection, allocator, caches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd_seconds(weights: list[torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward through ``x -> x W1^T -> (x W1^T) W2^T ...``."""
    times = []
    for i in range(WARMUP + repeats):
        for t in (x, *weights):
            t.grad = None
        _sync(x.device)
        start = time.perf_counter()
        y = x
        for w in weights:
            y = F.linear(y, w)  # (tokens, rows of w)
        y.backward(torch.ones_like(y))  # input and weight gradients, as inside a network
        _sync(x.device)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_layer(
    in_features: int,
    out_features: int,
    rank: int,
    tokens: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    repeats: int = 5,
) -> dict[str, float]:
    """Forward+backward seconds of a dense (out, in) layer and of its rank-``rank`` factorization.

    Returns ``{"dense_s", "factorized_s"}``: medians over ``repeats`` timed runs after warm-up,
    on a batch of ``tokens`` rows. Uses its own random generator (the training RNG is not
    touched), runs with gradients on and autocast off whatever the caller's context.
    """
    device = torch.device(device)
    dtype = dtype or torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_(True)

    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        x = make(tokens, in_features)  # (tokens, in)
        dense = _fwd_bwd_seconds([make(out_features, in_features)], x, repeats)
        factorized = _fwd_bwd_seconds([make(rank, in_features), make(out_features, rank)], x, repeats)  # A (r, in), B (out, r)
    return {"dense_s": dense, "factorized_s": factorized}
