"""What the top of a spectrum, found by a randomized sketch, proves about the whole of it.

A sketch of W (m x n) is an orthonormal basis Q (m x l) and B = QᵀW (l x n). It gives:

- the singular values s̃ of B, each at most the true one: s̃_j <= σ_j (Cauchy interlacing);
- the residual energy R = ||W||_F² - ||B||_F² = ||(I - QQᵀ)W||_F² (Q is orthonormal);
- ρ >= ||(I - QQᵀ)W||_2², the least of the bounds read from each block the sketch grew
  (see :func:`spectral_bound_factor`); this is the only random part: it holds with
  probability at least 1 - :data:`FAILURE` over the engine's own Gaussian draws, whatever
  the matrix (each round is given FAILURE / rounds, a union bound);
- y >= ||(I - QQᵀ)W Bᵀ||_2, one more pass over W (:data:`UNKNOWN` until computed).

From them, bounds on the cumulative energy E_k = σ_1² + ... + σ_k² for every k:

- lower: the s̃_j² raised to a water level c with sum(max(s̃_j², c)) = ||W||_F² over all
  min(m, n) values. No descending sequence above the s̃ with that sum has a smaller
  prefix sum (the flattest tail possible).
- upper: the least of ||W||_F², E~_k + R (Ky Fan: WᵀW = BᵀB + CᵀC with C = (I - QQᵀ)W), and
  a perturbation bound. In the basis [Q U_B, Q⊥] the Gram WWᵀ is [[S², Y], [Yᵀ, D]] with
  ||Y||_2 <= y and the eigenvalues of D in [0, ρ]. For every t > 0, 2xᵀYz <= t y² |x|² +
  |z|² / t, so WWᵀ ⪯ diag(S² + t y² I, D + I / t). With t = 1 / (s̃_k² - ρ) the top k
  of the right side are s̃_j² + t y², so E_k <= E~_k + k y² / (s̃_k² - ρ) while s̃_k² > ρ;
  past that each further value adds at most max(s̃_j², ρ) + y (Weyl).

An energy rank's interval [lo, hi] follows: lo from the upper bound, hi from the lower,
each widened by a rounding allowance (:func:`rounding_slack`). The engine reports a rank
when hi <= lo + :data:`CERTIFIED` * lo, and then reports hi: never below the exact rank
and at most 1 % above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from lowrank_audit.metrics import ENERGY_TARGETS, truncated_noise

# Probability, per matrix, that ρ falls below ||(I - QQᵀ)W||_2² (all its blocks together).
FAILURE = 1e-9
# A rank is reported when its interval's width is at most this share of its lower end.
CERTIFIED = 0.01
UNKNOWN = math.inf  # a coupling y not computed yet
_EPS32 = float(np.finfo(np.float32).eps)


@lru_cache(maxsize=256)
def spectral_bound_factor(dim: int, width: int, power: int, failure: float = FAILURE) -> float:
    """``1 / (1 - eps)``: the block's top value² times this bounds the residual's norm².

    A block is the range of C(CᵀC)^q Ω for the residual C and ``width`` Gaussian columns Ω
    of dimension ``dim``; its top singular value² is at least the Rayleigh quotient
    r = ωᵀG^P ω / ωᵀG^(P-1) ω of every column ω, G = CᵀC, P = 2q + 2 = ``power``. If
    r < (1 - ε) λ₁ then, splitting ω along G's eigenvectors and bounding each term of the
    eigenvalues below (1 - ε) λ₁ by the maximum of λ^(P-1) ((1 - ε) λ₁ - λ), the share of
    ω on the top eigenvector is below x = (1 - ε)^P c / ε with c = (P-1)^(P-1) / P^P, which
    for a Gaussian ω has probability at most sqrt(2 x (dim - 1) / (π (1 - x))). The
    columns are independent, so all of them fall short with at most that to the power
    ``width``. This returns the smallest ε (bisection) that brings it to ``failure``.
    """
    c = (power - 1) ** (power - 1) / power**power

    def chance(eps: float) -> float:
        x = (1 - eps) ** power * c / eps
        return math.sqrt(2 * x * (dim - 1) / (math.pi * (1 - x))) ** width if x < 1 else math.inf

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if chance(mid) <= failure else (mid, hi)
    return 1 / (1 - hi)


# Allowance for float32 rounding, in units of eps times the quantity's scale. The sketch's
# cumulative energies come out within about 2 eps ||W||_F² of a float64 SVD of the same
# matrix (tests/test_bounds.py, including a threshold exactly at a gap); 16 leaves 8x room.
# Worst-case GEMM bounds (n eps) would be 100x wider and keep every interval near a tie open.
ROUNDING = 16 * _EPS32


def rounding_slack(scale: float) -> float:
    """Allowance for float32 rounding in a quantity of size ``scale`` (an energy, or a product of norms)."""
    return ROUNDING * scale


@dataclass(frozen=True)
class Tail:
    """What a sketch of width l knows beyond its values (see the module docstring).

    ``values`` holds all l values of B; the interval arithmetic uses every one of them, as
    each is a lower bound, and the noise estimate the top ``trusted`` (l - p, those the
    report keeps).
    """

    values: np.ndarray  # (l,) float64, descending
    trusted: int
    residual: float  # R = ||(I - QQᵀ)W||_F²
    rho: float  # bound on ||(I - QQᵀ)W||_2²
    coupling: float  # bound on ||(I - QQᵀ)W Bᵀ||_2, UNKNOWN until computed

    def cumulative(self, energy: float, side: int) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds on E_1, ..., E_side (float64 arrays of length ``side``)."""
        s2 = np.zeros(side)
        s2[: len(self.values)] = np.square(self.values[:side])
        known = np.cumsum(s2)
        lower = np.cumsum(np.maximum(s2, _water_level(s2, energy)))
        ks = np.arange(1, side + 1)
        gap = s2 - self.rho
        above = int(np.argmin(gap > 0)) if gap[-1] <= 0 else side  # s̃_k² > ρ for k <= above
        y = self.coupling
        perturbed = known[:above] + ks[:above] * y * y / gap[:above] if math.isfinite(y) else np.full(above, np.inf)
        start = perturbed[-1] if above else 0.0
        weyl = start + np.cumsum(np.maximum(s2[above:], self.rho) + y)
        upper = np.minimum(np.minimum(known + self.residual, energy), np.concatenate([perturbed, weyl]))
        return lower, upper

    def interval(self, energy: float, side: int, target: float) -> tuple[int, int]:
        """``(lo, hi)``: the exact energy rank at ``target`` lies in it (0, 0 for the zero matrix)."""
        if energy <= 0:
            return 0, 0
        lower, upper = self.cumulative(energy, side)
        slack = rounding_slack(energy)
        lo = int(np.searchsorted(upper, target * energy - slack, side="left")) + 1
        hi = int(np.searchsorted(lower, target * energy + slack, side="left")) + 1
        return min(lo, side), min(max(hi, lo), side)


def _water_level(s2: np.ndarray, energy: float) -> float:
    """The c with sum(max(s2, c)) = energy (0 when the s2 already hold it all)."""
    excess = energy - float(np.sum(s2))
    if excess <= 0:
        return 0.0
    lo, hi = 0.0, energy / len(s2) + float(s2[0])
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(np.sum(np.maximum(s2, mid))) < energy else (lo, mid)
    return lo


def certified(lo: int, hi: int) -> bool:
    """Whether an interval is narrow enough to report its upper end as the rank."""
    return hi - lo <= CERTIFIED * lo


def noise_energy(tail: Tail, *, floor: float, rows: int, cols: int, eps: float) -> tuple[float, float, int | None]:
    """``(energy, sigma, signal_rank)`` of the noise under a sketched matrix.

    sigma and the signal rank come from the residual (:func:`~lowrank_audit.metrics.truncated_noise`);
    the noise energy is the Marchenko-Pastur total past the signal, sigma² (m - r)(n - r),
    once the sketch has passed the signal (r known), and never less than the precision
    ``floor`` (rounding noise is there whether or not the sketch reached it).
    """
    top, width = tail.values[: tail.trusted], len(tail.values)
    sigma, rank = truncated_noise(top, rows, cols, residual=tail.residual, width=width, eps=eps)
    mp = sigma * sigma * (rows - rank) * (cols - rank) if rank is not None else 0.0
    return max(mp, floor), sigma, rank


def settled(
    tail: Tail, *, energy: float, floor: float, rows: int, cols: int, eps: float, targets=ENERGY_TARGETS
) -> bool:
    """Whether a sketch has done all it usefully can for a report: each energy rank is either
    certified or lies in the noise (its target asks for more than the energy above the noise,
    ``target * E > E - noise``), where a wider sketch only slices noise."""
    if energy <= 0:
        return True
    side = min(rows, cols)
    noise: float | None = None
    for target in targets:
        if certified(*tail.interval(energy, side, target)):
            continue
        if noise is None:
            noise = noise_energy(tail, floor=floor, rows=rows, cols=cols, eps=eps)[0]
        if target * energy <= energy - noise:
            return False
    return True


def tail_metrics(tail: Tail, *, energy: float, floor: float, rows: int, cols: int, eps: float) -> dict[str, Any]:
    """The report's columns for a sketched row: certified energy ranks (else null) with their
    intervals, and the noise figures."""
    side = min(rows, cols)
    out: dict[str, Any] = {}
    for target in ENERGY_TARGETS:
        lo, hi = tail.interval(energy, side, target)
        name = f"k{round(target * 100)}"
        out |= {name: hi if certified(lo, hi) else None, f"{name}_lo": lo, f"{name}_hi": hi}
    _, sigma, rank = noise_energy(tail, floor=floor, rows=rows, cols=cols, eps=eps)
    out |= {
        "k95_ratio": out["k95"] / side if out["k95"] is not None else None,
        "signal_rank": rank,
        "noise_sigma": sigma if rank is not None else None,
        "noise_share": min(sigma * sigma * rows * cols / energy, 1.0) if energy > 0 and rank is not None else None,
    }
    return out


__all__ = [
    "CERTIFIED",
    "FAILURE",
    "UNKNOWN",
    "Tail",
    "certified",
    "noise_energy",
    "rounding_slack",
    "settled",
    "spectral_bound_factor",
    "tail_metrics",
]
