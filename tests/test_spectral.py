"""Spectral metrics against hand-computed values, factor SVDs against torch, degenerate spectra."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_lowrank.spectral import (
    condition_ratio,
    effective_rank,
    energy_fraction,
    explained_ratio,
    factor_svd,
    factor_svdvals,
    first_rank_above,
    scaled_stable_rank,
    stable_rank,
    svdvals,
)

S321 = torch.tensor([3.0, 2.0, 1.0])  # the singular values of diag(3, 2, 1)


def spectrum(*values):
    return torch.tensor(values, dtype=torch.float32)


# -- hand-computed values ---------------------------------------------------------------------


def test_svdvals_of_a_diagonal_matrix():
    s = svdvals(torch.diag(torch.tensor([1.0, 3.0, 2.0])))
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, S321)


@pytest.mark.parametrize(
    "s,expected",
    [
        (S321, 1),  # (9 + 4 + 1) / 9 = 1.56
        (spectrum(2, 2, 1), 2),  # 9 / 4 = 2.25
        (spectrum(1, 1, 1, 1), 4),  # flat: the full count
        (spectrum(5, 0, 0), 1),
        (spectrum(0.3, 0.3, 0.3), 3),  # flat with an inexact square, floor must not drop to 2
    ],
)
def test_stable_rank(s, expected):
    assert stable_rank(s) == expected


def test_energy_fraction():
    assert energy_fraction(S321, 0) == 0.0
    assert energy_fraction(S321, 1) == pytest.approx(9 / 14)
    assert energy_fraction(S321, 2) == pytest.approx(13 / 14)
    assert energy_fraction(S321, 3) == pytest.approx(1.0)
    assert energy_fraction(S321, 10) == pytest.approx(1.0)


def test_explained_ratio_is_inrank_variance_formula():
    # Var(3, 2, 1) = 1; Var(0, 2, 1) = 1; Var(0, 0, 1) = 1/3 (unbiased variance).
    assert explained_ratio(S321, 0) == 0.0
    assert explained_ratio(S321, 1) == pytest.approx(0.0, abs=1e-6)
    assert explained_ratio(S321, 2) == pytest.approx(2 / 3)
    assert explained_ratio(S321, 3) == pytest.approx(1.0)
    # Not the energy fraction: (10, 1, 1, 1) has Var 20.25, and the top-1 zeroed (0, 1, 1, 1) 0.25.
    assert explained_ratio(spectrum(10, 1, 1, 1), 1) == pytest.approx(1 - 0.25 / 20.25)
    assert explained_ratio(spectrum(10, 1, 1, 1), 1) != pytest.approx(energy_fraction(spectrum(10, 1, 1, 1), 1))


def test_explained_ratio_sorts_its_input():
    assert explained_ratio(spectrum(1, 3, 2), 2) == pytest.approx(2 / 3)


def test_explained_ratio_of_a_flat_spectrum_is_not_nan():
    flat = spectrum(2, 2, 2, 2)
    assert [explained_ratio(flat, k) for k in range(5)] == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_explained_ratio_never_goes_negative():
    # Nearly flat: zeroing the top entry spreads the rest far more than the whole (the raw formula gives -9950).
    assert explained_ratio(spectrum(1, 1, 1, 1, 0.99), 1) == 0.0


def test_effective_rank():
    assert effective_rank(spectrum(1, 1, 1, 1)) == pytest.approx(4.0, rel=1e-6)
    assert effective_rank(spectrum(7, 0, 0)) == pytest.approx(1.0)
    p = [1 / 2, 1 / 3, 1 / 6]
    assert effective_rank(S321) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-6)  # 2.749


def test_condition_ratio():
    assert condition_ratio(S321, 1) == 1.0
    assert condition_ratio(S321, 2) == pytest.approx(1.5)
    assert condition_ratio(S321, 3) == pytest.approx(3.0)
    assert condition_ratio(S321, 10) == pytest.approx(3.0), "k past the end is clamped to the last value"
    assert condition_ratio(spectrum(3, 0), 2) == math.inf


def test_scaled_stable_rank():
    assert scaled_stable_rank(S321, xi=2.5, full_rank=10) == 3  # ceil(2.5 * 1)
    assert scaled_stable_rank(S321, xi=20.0, full_rank=10) == 10  # capped at the full rank
    assert scaled_stable_rank(S321, xi=2.5, full_rank=10, floor_fraction=0.5) == 5
    assert scaled_stable_rank(spectrum(0, 0), xi=2.0, full_rank=10) == 1, "never below 1"


def test_first_rank_above():
    # rho(k) for (3, 2, 1): 0, 0, 2/3, 1 at k = 0..3
    assert first_rank_above(S321, 0.5, 0, 4) == 2
    assert first_rank_above(S321, 0.5, 1, 4) == 2
    assert first_rank_above(S321, 0.9, 0, 4) == 3
    assert first_rank_above(S321, 0.9, 0, 3) == 2, "none above: the last k scanned"
    assert first_rank_above(S321, 0.0, 2, 4) == 2, "strictly above the threshold"
    assert first_rank_above(S321, 0.5, 3, 3) == 3, "empty range: start"
    assert first_rank_above(S321, 0.5, 3, 1) == 3


# -- factor SVDs ------------------------------------------------------------------------------


@pytest.mark.parametrize("out_f,k,in_f", [(20, 5, 30), (30, 5, 20), (8, 8, 8), (12, 1, 7)])
def test_factor_svd_matches_torch(out_f, k, in_f):
    g = torch.Generator().manual_seed(out_f * k + in_f)
    B, A = torch.randn(out_f, k, generator=g), torch.randn(k, in_f, generator=g)
    W = B @ A
    s_ref = torch.linalg.svdvals(W)[:k]
    torch.testing.assert_close(factor_svdvals(B, A), s_ref, atol=1e-4, rtol=1e-5)
    U, S, Vh = factor_svd(B, A)
    assert U.shape == (out_f, k) and S.shape == (k,) and Vh.shape == (k, in_f)
    torch.testing.assert_close(S, s_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(U.T @ U, torch.eye(k), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k), atol=1e-5, rtol=0)
    # the leading singular vectors agree with torch's up to sign
    u_ref, _, vh_ref = torch.linalg.svd(W, full_matrices=False)
    sign = torch.sign((U[:, 0] * u_ref[:, 0]).sum())
    torch.testing.assert_close(U[:, 0] * sign, u_ref[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(Vh[0] * sign, vh_ref[0], atol=1e-4, rtol=0)


def test_factor_svdvals_of_rank_deficient_factors():
    """Factors with inactive (zero) B columns, as a layer with spare capacity has."""
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(16, 6, generator=g), torch.randn(6, 24, generator=g)
    B[:, 3:] = 0
    s = factor_svdvals(B, A)
    torch.testing.assert_close(s, torch.linalg.svdvals(B @ A)[:6], atol=1e-4, rtol=1e-5)
    assert (s[3:] < 1e-4).all()


# -- dtypes and degenerate spectra ------------------------------------------------------------


def test_bf16_inputs_give_float32_results():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 24, generator=g).bfloat16()
    s = svdvals(W)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.linalg.svdvals(W.float()))
    B, A = torch.randn(16, 4, generator=g).bfloat16(), torch.randn(4, 24, generator=g).bfloat16()
    assert factor_svdvals(B, A).dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in factor_svd(B, A))
    s16 = S321.bfloat16()  # exactly representable
    assert stable_rank(s16) == stable_rank(S321)
    assert explained_ratio(s16, 2) == pytest.approx(explained_ratio(S321, 2))
    assert effective_rank(s16) == pytest.approx(effective_rank(S321))
    assert energy_fraction(s16, 1) == pytest.approx(energy_fraction(S321, 1))
    for value in (explained_ratio(s16, 2), effective_rank(s16), energy_fraction(s16, 1), condition_ratio(s16, 2)):
        assert type(value) is float


DEGENERATE = {
    "zero": torch.zeros(4),
    "empty": torch.zeros(0),
    "nan": spectrum(3, float("nan"), 1),
    "inf": spectrum(float("inf"), 2, 1),
}


@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_spectra_give_neutral_values_not_nan(name):
    s = DEGENERATE[name]
    assert stable_rank(s) == 0
    assert energy_fraction(s, 2) == 1.0
    assert explained_ratio(s, 2) == 1.0
    assert effective_rank(s) == 0.0
    assert condition_ratio(s, 2) == 1.0
    assert scaled_stable_rank(s, 2.0, 8) == 1
    assert first_rank_above(s, 0.5, 1, 4) == 1


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_metrics_do_not_overflow_or_underflow(scale):
    """Every metric is scale-invariant; float32 squares of 1e20 or 1e-20 must not turn into NaN."""
    s = S321 * scale
    assert stable_rank(s) == 1
    assert energy_fraction(s, 1) == pytest.approx(9 / 14)
    assert explained_ratio(s, 2) == pytest.approx(2 / 3, rel=1e-5)
    assert effective_rank(s) == pytest.approx(effective_rank(S321), rel=1e-5)
    assert condition_ratio(s, 3) == pytest.approx(3.0)


# -- properties over random spectra -----------------------------------------------------------

spectra = st.tuples(
    st.lists(st.floats(0.0, 1.0, allow_subnormal=False, width=32), min_size=1, max_size=40),
    st.sampled_from([1e-25, 1e-6, 1.0, 1e3, 1e25]),
).map(lambda t: torch.tensor(sorted(t[0], reverse=True), dtype=torch.float32) * t[1])


@settings(max_examples=100, deadline=None)
@given(spectra)
def test_metric_bounds_on_random_spectra(s):
    n = s.numel()
    nonzero = int((s > 0).sum())
    ratios = [explained_ratio(s, k) for k in range(n + 1)]
    energies = [energy_fraction(s, k) for k in range(n + 1)]
    assert all(0.0 <= r <= 1.0 for r in ratios), ratios
    assert all(0.0 <= e <= 1.0 + 1e-6 for e in energies), energies
    assert all(b >= a - 1e-6 for a, b in zip(energies, energies[1:])), "energy fraction is monotone in k"
    assert ratios[n] == 1.0 and energies[n] == pytest.approx(1.0)
    if nonzero == 0:
        assert stable_rank(s) == 0 and effective_rank(s) == 0.0
        return
    if n >= 2:
        assert ratios[0] == 0.0
    assert energies[0] == 0.0
    assert 1 <= stable_rank(s) <= nonzero
    assert 1.0 - 1e-5 <= effective_rank(s) <= nonzero * (1 + 1e-5)
    assert condition_ratio(s, 1) == 1.0 and condition_ratio(s, n) >= 1.0
    for k in {0, n // 2, n}:
        r = first_rank_above(s, 0.8, k, n + 1)
        assert k <= r <= n
        assert r == n or ratios[r] > 0.8


@settings(max_examples=60, deadline=None)
@given(spectra, st.sampled_from([1e-20, 1e-3, 7.0, 1e20]))
def test_metrics_are_scale_invariant(s, c):
    n = s.numel()
    scaled = s * c
    if not bool(torch.isfinite(scaled).all()) or (float(s.max()) > 0 and float(scaled.max()) == 0):
        return  # out of float32 range entirely: a different (degenerate) spectrum
    if (s > 0).sum() != (scaled > 0).sum():
        return  # entries flushed to zero by the scaling
    if bool(((scaled > 0) & (scaled < torch.finfo(torch.float32).tiny)).any()):
        return  # subnormal after scaling: float32 no longer holds their ratios
    assert stable_rank(scaled) == stable_rank(s)
    assert effective_rank(scaled) == pytest.approx(effective_rank(s), rel=1e-4)
    for k in range(n + 1):
        assert energy_fraction(scaled, k) == pytest.approx(energy_fraction(s, k), abs=1e-5)
        assert explained_ratio(scaled, k) == pytest.approx(explained_ratio(s, k), abs=1e-4)


# -- InRank's rank test as the authors compute it ---------------------------------------------


def authors_rank(full: np.ndarray, alpha: float, r: int, b: int, capacity: int) -> int:
    """The InRank authors' scan re-derived with numpy from its formula: over every singular value
    of the product (all ``min(in, out)`` of them), ``rho(k) = 1 - var(s, top k zeroed) / var(s)``
    with the unbiased variance, first ``k`` in ``[r, min(r + b, capacity - b))`` above alpha,
    else the last ``k`` scanned."""
    total = np.var(full, ddof=1)
    for index in range(r, min(r + b, capacity - b)):
        rest = full.copy()
        rest[:index] = 0
        if 1 - np.var(rest, ddof=1) / total > alpha:
            break
    return index


N, CAP, R, BUF = 256, 128, 2, 40  # a 256-wide layer: capacity 128, r0 2, buffer 40, so 42 active components
ACTIVE = R + BUF
i = np.arange(1, ACTIVE + 1, dtype=np.float64)
SPECTRA = {
    "flat": np.ones(ACTIVE),
    "exp 0.5": 0.5**i,
    "exp 0.9": 0.9**i,
    "exp 0.99": 0.99**i,
    "1/i": 1 / i,
    "1/sqrt(i)": 1 / np.sqrt(i),
    "three non-zero": np.r_[5.0, 3.0, 1.0, np.zeros(ACTIVE - 3)],
    "one non-zero": np.r_[1.0, np.zeros(ACTIVE - 1)],
}


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.9, 0.99])
@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_rank_test_matches_the_authors_over_the_whole_spectrum(name, alpha):
    active = SPECTRA[name]
    full = np.r_[active, np.zeros(N - ACTIVE)]
    ours = first_rank_above(torch.tensor(active, dtype=torch.float32), alpha, R, min(R + BUF, CAP - BUF), length=N)
    assert ours == authors_rank(full, alpha, R, BUF, CAP)


def test_the_active_values_alone_give_another_rank():
    """Over the r + b non-zero values only, the variance ratio (and the rank) differ: the fix is the padding."""
    s = torch.tensor(SPECTRA["1/i"], dtype=torch.float32)
    full = np.r_[SPECTRA["1/i"], np.zeros(N - ACTIVE)]
    stop = min(R + BUF, CAP - BUF)
    assert first_rank_above(s, 0.9, R, stop, length=N) == authors_rank(full, 0.9, R, BUF, CAP)
    assert first_rank_above(s, 0.9, R, stop) != authors_rank(full, 0.9, R, BUF, CAP)
    assert explained_ratio(s, 5, length=N) != pytest.approx(explained_ratio(s, 5), abs=1e-3)


def test_kaiming_factors_of_a_gpt2_mlp_layer_give_the_authors_rank():
    """A 3072 x 768 layer at the authors' init (both factors Kaiming-uniform, capacity 384, r0 2, b 100):
    the spectrum from the factors, padded, gives the rank of the authors' SVD of the whole product."""
    out_f, in_f, capacity, r, b = 3072, 768, 384, 2, 100
    g = torch.Generator().manual_seed(0)
    bound_a, bound_b = 1 / math.sqrt(in_f), 1 / math.sqrt(capacity)  # kaiming_uniform_(a=sqrt(5)) bounds
    A = (torch.rand(capacity, in_f, generator=g) * 2 - 1) * bound_a
    B = (torch.rand(out_f, capacity, generator=g) * 2 - 1) * bound_b
    k = r + b
    full = torch.linalg.svdvals(A[:k].T @ B[:, :k].T).double().numpy()  # the authors' matrix: (in, out)
    expected = authors_rank(full, 0.9, r, b, capacity)
    s = factor_svdvals(B[:, :k], A[:k])
    assert first_rank_above(s, 0.9, r, min(r + b, capacity - b), length=min(out_f, in_f)) == expected
    assert first_rank_above(s, 0.9, r, min(r + b, capacity - b)) != expected, "over the 102 values alone it differs"
