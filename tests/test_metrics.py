"""Metrics against float64 references, closed forms, and their edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_audit import metrics
from tests.conftest import low_rank_plus_noise, reference_singular_values

EPS32 = float(np.finfo(np.float32).eps)


def test_energy_rank_definition_on_known_spectrum():
    s = np.array([8.0, 4.0, 2.0, 1.0])  # energies 64, 16, 4, 1 of 85
    energy = 85.0
    assert metrics.energy_rank(s, energy, 0.90) == 2  # 80/85 = 0.941
    assert metrics.energy_rank(s, energy, 0.95) == 3  # 84/85 = 0.988
    assert metrics.energy_rank(s, energy, 0.99) == 4
    assert metrics.energy_rank(s, energy, 64 / 85) == 1  # exactly at the threshold counts
    assert metrics.energy_rank(s, energy, 1.0) == 4
    # Full energy is full rank even when the total was summed in another order.
    s = np.random.default_rng(0).random(1000)
    for total in (float(np.sum(s**2)), float(np.cumsum(s**2)[-1]), float(np.linalg.norm(s) ** 2)):
        assert metrics.energy_rank(s, total, 1.0) == 1000


def test_energy_rank_edge_cases():
    assert metrics.energy_rank(np.zeros(3), 0.0, 0.95) == 0
    # Top of the spectrum only: a target the known values do not reach is None, not a guess.
    assert metrics.energy_rank(np.array([8.0, 4.0]), 85.0, 0.99) is None
    assert metrics.energy_rank(np.array([8.0, 4.0]), 85.0, 0.90) == 2


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    targets=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=2),
)
def test_energy_rank_is_eckart_young_optimal_and_monotone(k, seed, targets):
    """k_e is the smallest k whose best rank-k approximation keeps >= e of the energy."""
    w = low_rank_plus_noise(12, 9, k, 0.05, seed).numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    energy = float(np.sum(s**2))
    lo, hi = sorted(targets)
    k_lo, k_hi = metrics.energy_rank(s, energy, lo), metrics.energy_rank(s, energy, hi)
    assert k_lo <= k_hi  # monotone in the target
    for target, r in ((lo, k_lo), (hi, k_hi)):
        # Eckart-Young: ||W - W_r||_F^2 equals the discarded energy sum(s[r:]**2).
        w_r = (u[:, :r] * s[:r]) @ vt[:r]
        residual = float(np.linalg.norm(w - w_r) ** 2)
        assert residual == pytest.approx(float(np.sum(s[r:] ** 2)), rel=1e-9, abs=1e-12)
        assert 1 - residual / energy >= target - 1e-12
        if r > 1:
            w_short = (u[:, : r - 1] * s[: r - 1]) @ vt[: r - 1]
            assert 1 - float(np.linalg.norm(w - w_short) ** 2) / energy < target + 1e-12


def test_stable_and_effective_rank_closed_forms():
    assert metrics.stable_rank(np.ones(7), 7.0) == pytest.approx(7.0)
    assert metrics.stable_rank(np.array([3.0, 0.0]), 9.0) == pytest.approx(1.0)
    assert metrics.effective_rank(np.ones(7)) == pytest.approx(7.0)  # uniform: exp(log 7)
    assert metrics.effective_rank(np.array([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    p = np.array([0.5, 0.25, 0.25])
    assert metrics.effective_rank(p * 4) == pytest.approx(math.exp(-np.sum(p * np.log(p))))
    assert metrics.stable_rank(np.zeros(3), 0.0) == 0.0
    assert metrics.effective_rank(np.zeros(3)) == 0.0


def test_numerical_rank_matches_numpy_matrix_rank():
    for rank in (1, 3, 7):
        w = low_rank_plus_noise(40, 30, rank, 0.0, seed=rank).numpy()
        s = reference_singular_values(w)
        eps64 = float(np.finfo(np.float64).eps)
        assert metrics.numerical_rank(s, 40, 30, eps64) == np.linalg.matrix_rank(w) == rank
    # Negative control: a tolerance of 0 counts round-off as rank.
    assert metrics.numerical_rank(s, 40, 30, 0.0) > rank


def test_rank_above_a_relative_tolerance_matches_numpy():
    w = low_rank_plus_noise(50, 40, 6, 1e-3, seed=11).numpy()  # s = 10, 5, ..., 0.3125, then noise below 0.012
    s = reference_singular_values(w)
    for rtol in (1e-4, 1e-2, 0.1, 0.5):
        assert metrics.rank_above(s, rtol) == np.linalg.matrix_rank(w, tol=rtol * s[0])
    assert metrics.rank_above(s, 1e-2) == 6 and metrics.rank_above(s, 1e-5) == 40
    assert metrics.rank_above(np.zeros(3), 0.5) == 0 and metrics.rank_above(np.array([]), 0.5) == 0


def test_marchenko_pastur_median_and_threshold_match_gavish_donoho():
    # Gavish & Donoho (2014), Table / eq. (5): omega(1) = 2.858 and the cubic fit
    # 0.56 b^3 - 0.95 b^2 + 1.82 b + 1.43, accurate to about 1 % for b >= 0.05.
    assert metrics.optimal_threshold_coefficient(1.0) == pytest.approx(2.858, abs=5e-4)
    for beta in (0.05, 0.1, 0.25, 0.5, 0.75, 1.0):
        fit = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        assert metrics.optimal_threshold_coefficient(beta) == pytest.approx(fit, rel=0.01)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_marchenko_pastur_median_against_scipy_quadrature(beta):
    """An independent reference: SciPy's adaptive quadrature of the density, and a root finder."""
    from scipy import integrate, optimize

    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(t):
        return math.sqrt(max((hi - t) * (t - lo), 0.0)) / (2 * math.pi * beta * t)

    def mass_below(x):
        return integrate.quad(lambda u: 2 * u * density(lo + u * u), 0.0, math.sqrt(x - lo), limit=200)[0] - 0.5

    assert integrate.quad(density, lo, hi, limit=200)[0] == pytest.approx(1.0, abs=1e-8)
    want = optimize.brentq(mass_below, lo + 1e-12, hi, xtol=1e-14)
    assert metrics.marchenko_pastur_median(beta) == pytest.approx(want, rel=1e-9)


def test_marchenko_pastur_median_against_sampled_eigenvalues():
    rng = np.random.default_rng(0)
    m, n = 400, 1600  # beta = 0.25
    x = rng.standard_normal((m, n))
    eig = np.linalg.eigvalsh(x @ x.T / n)
    assert metrics.marchenko_pastur_median(m / n) == pytest.approx(float(np.median(eig)), rel=0.01)
    # Negative control: the square-matrix median is far from this sample's.
    assert abs(metrics.marchenko_pastur_median(1.0) - float(np.median(eig))) > 0.1


@pytest.mark.parametrize(("rows", "cols", "rank"), [(200, 100, 5), (100, 300, 3), (150, 150, 8)])
def test_signal_rank_recovers_planted_rank(rows, cols, rank):
    # Noise whose Marchenko-Pastur edge sigma * (sqrt(m) + sqrt(n)) is a third of the
    # smallest planted singular value 10 * 0.5**(rank - 1): every component is detectable.
    edge = math.sqrt(rows) + math.sqrt(cols)
    sigma = 10 * 0.5 ** (rank - 1) / (3 * edge)
    s = reference_singular_values(low_rank_plus_noise(rows, cols, rank, sigma, seed=rows + rank).numpy())
    assert metrics.signal_rank(s, rows, cols, EPS32) == rank
    # Components below the noise edge are not signal: ten times the noise hides the
    # planted values under 10 * edge * sigma.
    s = reference_singular_values(low_rank_plus_noise(rows, cols, rank, 10 * sigma, seed=rows + rank).numpy())
    hidden = sum(10 * 0.5**i < 10 * sigma * edge for i in range(rank))
    assert metrics.signal_rank(s, rows, cols, EPS32) == rank - hidden
    # Negative control: pure noise has no signal.
    noise = np.random.default_rng(rank).standard_normal((rows, cols))
    assert metrics.signal_rank(reference_singular_values(noise), rows, cols, EPS32) == 0


def test_signal_rank_never_counts_round_off():
    w = low_rank_plus_noise(96, 64, 4, 0.0, seed=3).float().numpy()  # exact rank 4 in float32
    s = reference_singular_values(w)
    assert metrics.signal_rank(s, 96, 64, EPS32) == 4


def test_matrix_metrics_full_and_truncated():
    s = np.array([8.0, 4.0, 2.0, 1.0])
    full = metrics.matrix_metrics(s, 4, 6, eps=EPS32)
    assert full["frobenius_norm"] == pytest.approx(math.sqrt(85))
    assert full["nuclear_norm"] == 15.0 and full["spectral_norm"] == 8.0
    assert full["condition_number"] == 8.0 and (full["k90"], full["k95"], full["k99"]) == (2, 3, 4)
    assert full["k95_ratio"] == 0.75
    assert (full["k90_lo"], full["k90_hi"]) == (2, 2)
    top = metrics.matrix_metrics(s[:2], 4, 6, eps=EPS32, energy=85.0)
    assert top["frobenius_norm"] == pytest.approx(math.sqrt(85))
    # Of a truncated spectrum, ranks come only from lowrank_audit.bounds (tests/test_bounds.py).
    for key in ("nuclear_norm", "effective_rank", "numerical_rank", "signal_rank", "condition_number", "k90", "k95",
                "k99", "k90_lo", "k99_hi", "noise_sigma"):  # fmt: skip
        assert top[key] is None, key
    with pytest.raises(ValueError, match="energy"):
        metrics.matrix_metrics(s[:2], 4, 6, eps=EPS32)


def test_zero_matrix():
    out = metrics.matrix_metrics(np.zeros(3), 3, 5, eps=EPS32)
    assert out["k90"] == out["k99"] == out["numerical_rank"] == out["signal_rank"] == 0
    assert out["stable_rank"] == out["effective_rank"] == 0.0 and out["condition_number"] is None
