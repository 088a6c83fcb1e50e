"""Singular values and the rank metrics the strategies decide with (see docs/methods.md).

Everything here is computed in float32 whatever the training dtype, returns plain Python
numbers or float32 tensors, and never raises on a degenerate spectrum: a zero or NaN spectrum
gives the metric's neutral value (documented per function) instead of NaN.
"""

from __future__ import annotations

import math

import torch


def svdvals(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a dense matrix, descending, float32, on the matrix's device."""
    return torch.linalg.svdvals(weight.detach().float())


def _thin_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, r = torch.linalg.qr(x.detach().float(), mode="reduced")
    return q, r


def factor_svdvals(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of ``B @ A`` without forming it.

    ``B`` is (out, k) and ``A`` is (k, in). With ``B = Q_B R_B`` and ``A^T = Q_A R_A`` the
    product is ``Q_B (R_B R_A^T) Q_A^T``, so its spectrum is that of the (k, k) core: the cost
    is O((out + in) k^2) instead of O(out * in * min(out, in)).
    """
    _, r_b = _thin_qr(B)  # (k, k)
    _, r_a = _thin_qr(A.T)  # (k, k)
    return torch.linalg.svdvals(r_b @ r_a.T)


def factor_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vh`` of ``B @ A`` computed through the (k, k) core, float32."""
    q_b, r_b = _thin_qr(B)  # (out, k), (k, k)
    q_a, r_a = _thin_qr(A.T)  # (in, k), (k, k)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u_c, s, vh_c @ q_a.T  # (out, k), (k,), (k, in)


def _clean(s: torch.Tensor) -> torch.Tensor | None:
    """Float32 spectrum scaled to a maximum of 1, or None when it is empty, all zero or not finite.

    Every metric here is scale-invariant; scaling first keeps ``s**2`` and the variance from
    overflowing or underflowing float32 (which gave NaN for spectra near 1e20 or 1e-20).
    """
    s = s.detach()
    s = s if s.dtype == torch.float64 else s.float()
    if s.numel() == 0 or not bool(torch.isfinite(s).all()) or float(s.max()) <= 0.0:
        return None
    return (s / s.max()).float()


def stable_rank(s: torch.Tensor) -> int:
    """``floor(sum s_i^2 / s_1^2)``; 0 for a zero or non-finite spectrum."""
    s = _clean(s)
    if s is None:
        return 0
    return int(math.floor(float((s**2).sum() / s.max() ** 2) + 1e-6))


def energy_fraction(s: torch.Tensor, k: int) -> float:
    """``sum_{i<=k} s_i^2 / sum s_i^2``; 1.0 for a zero spectrum (nothing left to explain)."""
    s = _clean(s)
    if s is None:
        return 1.0
    e = s**2
    return float(e[:k].sum() / e.sum())


def explained_ratios(s: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """InRank's ``rho(k) = 1 - Var(s with the top k set to 0) / Var(s)`` for every ``k = 0 .. length``.

    ``s`` is taken as the spectrum of a matrix with ``length`` singular values (default
    ``len(s)``), padded with zeros: a rank-``k`` product of an (out, in) layer has
    ``min(in, out)`` singular values of which all but ``k`` are zero, and the InRank authors
    compute the ratio over all of them. The variance is unbiased, as ``torch.var``.

    Returns a float64 tensor of ``length + 1`` ratios in [0, 1]. A flat spectrum (``Var(s) =
    0``) explains nothing with fewer than all its entries: 0.0 below ``length``, 1.0 at it.
    The formula goes negative when zeroing the top entries spreads the rest more than the
    whole (nearly flat spectra); it is clamped to 0.0, which changes no ``rho(k) > alpha``
    test with ``alpha >= 0``. A zero or non-finite spectrum gives 1.0 everywhere (nothing
    left to explain).
    """
    n = s.numel() if length is None else max(int(length), s.numel())
    clean = _clean(s)
    if clean is None or n < 2:
        return torch.ones(n + 1, dtype=torch.float64)
    x = torch.zeros(n, dtype=torch.float64)
    x[: clean.numel()] = clean.double().sort(descending=True).values
    # Sums over the entries left after zeroing the top k, for every k at once: suffix sums,
    # which stay exact where only small entries are left (a prefix-sum difference would not).
    zero = x.new_zeros(1)
    rest_sum = torch.cat([x.flip(0).cumsum(0).flip(0), zero])
    rest_sq = torch.cat([(x * x).flip(0).cumsum(0).flip(0), zero])
    rest_var = (rest_sq - rest_sum**2 / n).clamp_min(0) / (n - 1)
    total = float(rest_var[0])
    if total <= 1e-12:  # flat (the maximum is 1 after _clean)
        ratios = torch.zeros(n + 1, dtype=torch.float64)
        ratios[n] = 1.0
        return ratios
    return (1.0 - rest_var / total).clamp(0.0, 1.0)


def explained_ratio(s: torch.Tensor, k: int, length: int | None = None) -> float:
    """``rho(k)`` of :func:`explained_ratios`: the spectrum padded with zeros to ``length`` entries."""
    ratios = explained_ratios(s, length)
    return float(ratios[min(max(k, 0), ratios.numel() - 1)])


def effective_rank(s: torch.Tensor) -> float:
    """Roy and Vetterli's ``exp(H(p))`` with ``p_i = s_i / sum s``; 0.0 for a zero spectrum."""
    s = _clean(s)
    if s is None:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def condition_ratio(s: torch.Tensor, k: int) -> float:
    """``s_1 / s_k`` (k counted from 1); inf when ``s_k`` is zero, 1.0 for a zero spectrum."""
    s = _clean(s)
    if s is None:
        return 1.0
    k = max(1, min(k, s.numel()))
    return float(s[0] / s[k - 1]) if float(s[k - 1]) > 0 else math.inf


def scaled_stable_rank(s: torch.Tensor, xi: float, full_rank: int, floor_fraction: float = 0.0) -> int:
    """Cuttlefish's ``min(full, ceil(xi * srank(W)))``, at least ``floor_fraction * full`` and 1."""
    r = min(full_rank, math.ceil(xi * stable_rank(s)))
    return max(1, r, math.floor(floor_fraction * full_rank))


def first_rank_above(s: torch.Tensor, threshold: float, start: int, stop: int, length: int | None = None) -> int:
    """InRank's scan: the first ``k`` in ``[start, stop)`` with ``rho(k) > threshold``, else ``stop - 1``.

    ``rho`` is taken over ``s`` padded with zeros to ``length`` entries (the layer's
    ``min(in, out)``), as the authors' code takes it over every singular value of the product.
    Returns ``start`` when the range is empty.
    """
    if stop <= start:
        return start
    ratios = explained_ratios(s, length)
    for k in range(start, stop):
        if float(ratios[min(k, ratios.numel() - 1)]) > threshold:
            return k
    return stop - 1
