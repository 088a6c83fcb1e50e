"""Measured cost of a layer, dense vs factorized, on the device training runs on."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd_seconds(weights: list[torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward through ``x @ W1^T @ W2^T ...``."""
    times = []
    for i in range(repeats + 2):  # two warm-up runs
        for w in weights:
            w.grad = None
        _sync(x.device)
        start = time.perf_counter()
        y = x
        for w in weights:
            y = F.linear(y, w)
        y.sum().backward()
        _sync(x.device)
        if i >= 2:
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
    """Forward+backward seconds of a dense (out, in) layer and of its rank-``rank`` factorization."""
    device = torch.device(device)
    dtype = dtype or torch.float32
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    x = make(tokens, in_features)
    dense = _fwd_bwd_seconds([make(out_features, in_features)], x, repeats)
    factorized = _fwd_bwd_seconds([make(rank, in_features), make(out_features, rank)], x, repeats)
    return {"dense_s": dense, "factorized_s": factorized, "speedup": dense / max(factorized, 1e-12)}
