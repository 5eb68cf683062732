"""Pure functions of a matrix's singular values (descending, float64) and its shape.

Conventions, tested in ``tests/test_metrics.py``:

- ``energy`` is the squared Frobenius norm, ``sum(s**2)``, accumulated in float64.
- Energy rank ``k_e``: the smallest k with ``sum(s[:k]**2) >= e * energy``; 0 for the
  zero matrix; ``None`` when only the top of the spectrum is known and it does not
  reach the target.
- Figures that need the whole spectrum (nuclear norm, effective rank, numerical rank,
  signal rank, condition number) are ``None`` when ``s`` holds only the top values.
- The zero matrix has every rank 0, stable and effective rank 0, condition number None.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

ENERGY_TARGETS = (0.90, 0.95, 0.99)
_SUM_SLACK = 64 * float(np.finfo(np.float64).eps)


def energy_rank(s: np.ndarray, energy: float, target: float) -> int | None:
    """Smallest k with ``sum(s[:k]**2) >= target * energy``.

    Args:
        s: Singular values of shape (k,), descending.
        energy: The matrix's squared Frobenius norm (``sum(s**2)`` for a full spectrum).
        target: Energy fraction in (0, 1].

    Returns:
        The rank, 0 for the zero matrix, or None when ``s`` does not reach the target.
    """
    if energy <= 0.0:
        return 0
    cumulative = np.cumsum(np.square(s, dtype=np.float64))
    # Energies summed in another order (pairwise, or from W itself) differ in the last few
    # bits; 64 ulps of slack keeps target = 1.0 at full rank instead of "not reached".
    k = int(np.searchsorted(cumulative, target * energy * (1 - _SUM_SLACK), side="left")) + 1
    return k if k <= len(s) else None


def stable_rank(s: np.ndarray, energy: float) -> float:
    """``||W||_F^2 / ||W||_2^2`` (Rudelson & Vershynin); 0 for the zero matrix."""
    return float(energy / s[0] ** 2) if len(s) and s[0] > 0 else 0.0


def effective_rank(s: np.ndarray) -> float:
    """Entropy effective rank ``exp(H(p))`` with ``p = s / sum(s)`` (Roy & Vetterli, 2007)."""
    total = float(np.sum(s))
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def rank_above(s: np.ndarray, rtol: float) -> int:
    """Count of singular values above ``rtol * s[0]``; 0 for the zero matrix."""
    if not len(s) or s[0] <= 0.0:
        return 0
    return int(np.count_nonzero(s > s[0] * rtol))


def numerical_rank(s: np.ndarray, rows: int, cols: int, eps: float) -> int:
    """Count of ``s > s[0] * max(rows, cols) * eps``: LAPACK's and NumPy's ``matrix_rank`` rule.

    ``eps`` is the machine epsilon of the dtype the decomposition ran in.
    """
    return rank_above(s, max(rows, cols) * eps)


_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(80)


def _marchenko_pastur_below(beta: float, theta: float) -> tuple[float, float]:
    """Mass and first moment of the Marchenko-Pastur law (ratio ``beta``, unit variance) below
    ``t(theta) = lo + (hi - lo) sin^2(theta / 2)``.

    The law has density ``sqrt((hi - t)(t - lo)) / (2 pi beta t)`` on ``[lo, hi] =
    [(1 - sqrt(beta))^2, (1 + sqrt(beta))^2]``. Substituting ``t(theta)`` turns it into a
    smooth integrand on ``[0, pi]`` (no endpoint singularities, even at beta = 1), so
    Gauss-Legendre quadrature is accurate to about 1e-13. NumPy only: importing SciPy's
    integrators would cost the CLI a second at start-up.
    """
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    th = (_GAUSS_NODES + 1) * (theta / 2)
    t = lo + (hi - lo) * np.sin(th / 2) ** 2
    density = (hi - lo) ** 2 * np.sin(th) ** 2 / (8 * math.pi * beta * t)
    return float(_GAUSS_WEIGHTS @ density) * theta / 2, float(_GAUSS_WEIGHTS @ (density * t)) * theta / 2


def _marchenko_pastur_quantile(beta: float, mass: float) -> float:
    """The theta at which the law's mass below t(theta) is ``mass`` (bisection)."""
    left, right = 0.0, math.pi
    for _ in range(60):  # 60 halvings of pi: below float64 resolution
        mid = (left + right) / 2
        left, right = (mid, right) if _marchenko_pastur_below(beta, mid)[0] < mass else (left, mid)
    return (left + right) / 2


@lru_cache(maxsize=256)
def marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law with aspect ratio ``beta`` in (0, 1] and unit variance."""
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    return lo + (hi - lo) * math.sin(_marchenko_pastur_quantile(beta, 0.5) / 2) ** 2


@lru_cache(maxsize=4096)
def marchenko_pastur_energy_below(beta: float, top: float) -> float:
    """The share of a pure-noise matrix's energy held by all but its top ``top`` fraction of
    eigenvalues (Marchenko-Pastur, ratio ``beta``; the law's mean is 1)."""
    if top <= 0:
        return 1.0
    if top >= 1:
        return 0.0
    return _marchenko_pastur_below(beta, _marchenko_pastur_quantile(beta, 1 - top))[1]


def _lambda_star(beta: float) -> float:
    """Gavish & Donoho's lambda*(beta), eq. (11): the known-noise threshold in units of sqrt(n) sigma."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta * beta + 14 * beta + 1)))


def optimal_threshold_coefficient(beta: float) -> float:
    """Gavish & Donoho's ``omega(beta)``: the hard threshold for unknown noise is ``omega * median(s)``.

    ``omega(beta) = lambda*(beta) / sqrt(mu_beta)`` with ``lambda*`` their eq. (11) and
    ``mu_beta`` the Marchenko-Pastur median (IEEE Trans. Inf. Theory 60(8), 2014).
    """
    return _lambda_star(beta) / math.sqrt(marchenko_pastur_median(beta))


def signal_rank(s: np.ndarray, rows: int, cols: int, eps: float) -> int:
    """Singular values above the Gavish-Donoho optimal hard threshold (noise level unknown).

    Never more than :func:`numerical_rank`: for an exactly low-rank matrix the "noise" is
    round-off, and values below the numerical tolerance are zero at this precision.
    """
    if not len(s) or s[0] <= 0.0:
        return 0
    beta = min(rows, cols) / max(rows, cols)
    # Round beta so the cache is shared by matrices of nearly equal aspect; omega moves by
    # less than 1e-6 over that step.
    tau = optimal_threshold_coefficient(round(beta, 9)) * float(np.median(s))
    return min(int(np.count_nonzero(s > tau)), numerical_rank(s, rows, cols, eps))


def _threshold(beta: float, larger: int, sigma: float) -> float:
    """Gavish & Donoho's hard threshold for a known noise level: lambda*(beta) sqrt(n) sigma."""
    return _lambda_star(beta) * math.sqrt(larger) * sigma


def noise_sigma(s: np.ndarray, rows: int, cols: int) -> float:
    """The noise level of a complete spectrum: median(s) / sqrt(max(rows, cols) mu_beta)
    (Gavish & Donoho's estimator; the one behind :func:`signal_rank`)."""
    beta = min(rows, cols) / max(rows, cols)
    return float(np.median(s)) / math.sqrt(max(rows, cols) * marchenko_pastur_median(round(beta, 9)))


def truncated_noise(
    s: np.ndarray, rows: int, cols: int, *, residual: float, width: int, eps: float
) -> tuple[float, int | None]:
    """Noise level and signal rank of a matrix known by a sketch: top values ``s`` and the
    energy ``residual`` left outside a sketch of ``width`` columns.

    Model (Gavish & Donoho 2014): W = signal of rank r + noise of entry variance sigma².
    Past the signal, the spectrum is that of an (m - r) x (n - r) noise matrix
    (Marchenko-Pastur), whose top width - r values the sketch took; the residual is the
    rest, so sigma² = residual / ((m - r)(n - r) share(width - r)) with
    :func:`marchenko_pastur_energy_below`. r starts at 0 and is recounted as the values
    above the known-noise threshold :func:`_threshold` until it settles.

    Returns:
        ``(sigma, r)``; r is None unless it is at most half the sketch: the last values of a
        sketch fall short of the true ones by up to 10 % (tests/test_bounds.py), so a count
        near its end is not one; sigma then also counts signal the sketch did not reach.
    """
    big, small = max(rows, cols), min(rows, cols)
    beta = small / big
    cap = numerical_rank(s, rows, cols, eps) if len(s) else 0
    rank, sigma = 0, 0.0
    for _ in range(8):
        m, n = big - rank, small - rank
        share = marchenko_pastur_energy_below(round(n / m, 6), round((width - rank) / n, 6)) if n > 0 else 0.0
        sigma = math.sqrt(residual / (m * n * share)) if share > 0 and residual > 0 else 0.0
        count = min(int(np.count_nonzero(s > _threshold(beta, big, sigma))), cap)
        if count == rank:
            break
        rank = min(count, width - 1)
    return sigma, (rank if 2 * rank <= width else None)


def matrix_metrics(s: np.ndarray, rows: int, cols: int, *, eps: float, energy: float | None = None) -> dict[str, Any]:
    """Every per-matrix figure of the report that depends on the singular values.

    Args:
        s: Singular values of shape (k,), descending, k <= min(rows, cols).
        rows, cols: The matrix shape.
        eps: Machine epsilon of the decomposition's dtype (for the numerical rank).
        energy: ``||W||_F^2``; required when ``s`` holds only the top k values,
            taken from ``s`` otherwise.

    Returns:
        A dict keyed by report column names.
    """
    s = np.asarray(s, dtype=np.float64)
    complete = len(s) == min(rows, cols)
    if complete:  # the singular values' own sum, so that energy ranks reach 1.0 exactly
        energy = float(np.cumsum(np.square(s))[-1]) if len(s) else 0.0  # the same sum energy_rank sees
    elif energy is None:
        raise ValueError("energy (the squared Frobenius norm) is required for a truncated spectrum")
    spectral = float(s[0]) if len(s) else 0.0
    sigma = noise_sigma(s, rows, cols) if complete and len(s) else None
    out: dict[str, Any] = {
        "frobenius_norm": math.sqrt(energy),
        "spectral_norm": spectral,
        "nuclear_norm": float(np.sum(s)) if complete else None,
        "stable_rank": stable_rank(s, energy),
        "effective_rank": effective_rank(s) if complete else None,
        "numerical_rank": numerical_rank(s, rows, cols, eps) if complete else None,
        "signal_rank": signal_rank(s, rows, cols, eps) if complete else None,
        "noise_sigma": sigma,
        "noise_share": min(sigma * sigma * rows * cols / energy, 1.0) if sigma is not None and energy > 0 else None,
        "condition_number": (spectral / s[-1] if s[-1] > 0 else math.inf) if complete and spectral > 0 else None,
    }
    for target in ENERGY_TARGETS:
        # Of a truncated spectrum only the bounds of lowrank_audit.bounds tell the ranks.
        k = energy_rank(s, energy, target) if complete else None
        out |= {f"k{round(target * 100)}": k, f"k{round(target * 100)}_lo": k, f"k{round(target * 100)}_hi": k}
    k95 = out["k95"]
    out["k95_ratio"] = k95 / min(rows, cols) if k95 is not None else None
    return out


__all__ = [
    "ENERGY_TARGETS",
    "effective_rank",
    "energy_rank",
    "marchenko_pastur_median",
    "marchenko_pastur_energy_below",
    "matrix_metrics",
    "noise_sigma",
    "numerical_rank",
    "optimal_threshold_coefficient",
    "rank_above",
    "signal_rank",
    "stable_rank",
    "truncated_noise",
]
