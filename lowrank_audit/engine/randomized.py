"""Randomized truncated SVD of a ``(b, m, n)`` stack, as wide as each matrix needs.

One algorithm serves a fixed rank and an energy target. The sketch is a blocked randQB
(Yu, Gu & Li, SIAM J. Matrix Anal. Appl. 39(2), 2018): an orthonormal basis Q of each
matrix's dominant range and B = QᵀW, grown block by block without recomputing, each block
refined by power iterations (Halko, Martinsson & Tropp, SIAM Review 53(2), 2011, Alg. 4.4).
The SVD of the small B = U_B S Vh gives the triplets: U = Q U_B, S, Vh. A matrix whose rank
is known up front (a fixed rank) gets one block of rank + p columns; one whose rank
depends on its spectrum (an energy target) grows by ``BLOCK`` columns until its need is met
with p columns to spare (p = ``OVERSAMPLE`` for values, ``FACTOR_OVERSAMPLE`` for
factors). Once the sketch would pass a quarter of min(m, n) the rest are decomposed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from lowrank_audit.bounds import FAILURE, UNKNOWN, Tail, rounding_slack, spectral_bound_factor
from lowrank_audit.engine.exact import RankOf, Triplets, exact_triplets

Settle = Callable[[Tail], bool]  # whether what a sketch proves about a matrix is enough

# Halko et al. 2011, section 4.2: oversampling p = 10 makes the top-k subspace reliable.
OVERSAMPLE = 10
# Section 4.5: q = 1 or 2 power iterations for slowly decaying spectra. tests/test_randomized.py
# shows q = 2 meets the float32 tolerance on singular values of decaying spectra and q = 0
# does not.
POWER_ITERATIONS = 2
# Factors are held to a stricter bound: a reconstruction error within 1 % of the exact
# truncation's. On the fp16 fine-tune deltas of benchmarks/compress.py (spectrum near 1/i
# over a noise floor) p = 10 came 0.9-1.2 % above it at rank 128. More columns cost less
# than more power iterations there: p = 32 stayed within 0.37 % at ranks 16 to 256 (0.92 s
# a layer at rank 128), q = 4 within 0.23 % (1.37 s), q = 3 within 0.48 % (1.08 s).
FACTOR_OVERSAMPLE = 32
# Columns added to the sketch per round of the adaptive path (benchmarks/README.md: 48
# lands k99 of LLaMA-7B shapes within one round of its final width).
BLOCK = 48
# Randomized SVD costs about (2q + 2) passes of 2mnk flops; past k = min(m, n) / 4 that
# costs more than one exact decomposition (benchmarks/README.md).
EXACT_FRACTION = 0.25


@dataclass(frozen=True)
class _Sketch:
    """An orthonormal basis ``q`` (b, m, l) of each matrix's dominant range and ``b = q^T W``
    (b, l, n), grown block by block; ``generators`` continue each matrix's random stream."""

    q: torch.Tensor
    b: torch.Tensor
    generators: list[torch.Generator]

    @classmethod
    def empty(cls, batch: torch.Tensor, seeds: Sequence[int]) -> _Sketch:
        b, m, n = batch.shape
        return cls(
            batch.new_zeros(b, m, 0), batch.new_zeros(b, 0, n), [torch.Generator().manual_seed(s) for s in seeds]
        )

    @property
    def width(self) -> int:
        return self.q.shape[-1]

    def rows(self, rows: list[int]) -> _Sketch:
        return _Sketch(select_rows(self.q, rows), select_rows(self.b, rows), [self.generators[i] for i in rows])


def _grow(batch: torch.Tensor, sketch: _Sketch, width: int, power_iterations: int) -> _Sketch:
    """Add ``width`` columns to the basis (Yu, Gu & Li 2018, randQB_b with power iterations).

    Every product with W is taken against the part of the range not yet captured,
    ``(I - Q Q^T) W``, which ``B = Q^T W`` gives without another pass over W.
    """
    q, b = sketch.q, sketch.b
    n = batch.shape[-1]
    # Each matrix's test matrix is drawn on the CPU from its own stream, so values do not
    # depend on batching and CPU and CUDA runs use the same one.
    omega = torch.stack([torch.randn(n, width, generator=g, dtype=batch.dtype) for g in sketch.generators])
    omega = omega.to(batch.device)  # (b, n, width)
    block = torch.linalg.qr(batch @ omega - q @ (b @ omega)).Q  # (b, m, width)
    for _ in range(power_iterations):
        back = torch.linalg.qr(batch.mT @ block - b.mT @ (q.mT @ block)).Q  # (b, n, width)
        block = torch.linalg.qr(batch @ back - q @ (b @ back)).Q
    # Rounding leaves the new block slightly inside span(Q); one more projection restores
    # orthogonality (Gram-Schmidt twice is enough).
    block = torch.linalg.qr(block - q @ (q.mT @ block)).Q
    return _Sketch(torch.cat([q, block], dim=-1), torch.cat([b, block.mT @ batch], dim=-2), sketch.generators)


def _small_svd(b: torch.Tensor, vectors: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``U_B (b, l, l), S (b, l), Vh (b, l, n)`` of the wide ``B`` (only ``S`` without vectors)."""
    if not vectors:
        return torch.linalg.svdvals(b.mT), None, None  # (b, l); the tall orientation is faster
    u_t, s, vh_t = torch.linalg.svd(b.mT, full_matrices=False)  # B^T = U' S Vh': B = Vh'^T S U'^T
    return s, vh_t.mT, u_t.mT


def adaptive_svd(
    batch: torch.Tensor,
    rank_of: Sequence[RankOf],
    *,
    seeds: Sequence[int],
    vectors: bool,
    settle: Sequence[Settle] | None = None,
    energies: Sequence[float] = (),
    rank_cap: int | None = None,
    min_width: int = 0,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
    exact_fraction: float = EXACT_FRACTION,
) -> list[Triplets]:
    """Top singular triplets of each matrix of a ``(b, m, n)`` stack, as many as it needs.

    ``rank_of[i]`` says how many triplets matrix i needs given its top values known so far
    (None while they do not settle it). It is asked first with no values: a rank known
    then sets the width of the first block (rank + ``oversample``). Otherwise the sketch
    grows by ``BLOCK`` columns a round, never recomputing what it has (randQB_EI, Yu, Gu &
    Li 2018), and a matrix is done once its need is met by the top ``width - oversample``
    values and, with ``settle``, once ``settle[i]`` accepts what the sketch proves about the
    rest of its spectrum (a :class:`~lowrank_audit.bounds.Tail`; its coupling is computed,
    with one more pass over the matrix, only when the tail would pass without it). The
    values never exceed the true ones (Cauchy interlacing), so an energy rank read from
    them is never below the exact one. A matrix whose sketch would pass ``exact_fraction *
    min(m, n)`` is decomposed exactly instead, unless ``rank_cap`` is given: then its top
    ``rank_cap`` values are returned whether or not they meet the need. Exact matrices get
    every value.

    Args:
        batch: Matrices of shape (b, m, n), float32 or float64, on any device.
        rank_of: One need per matrix.
        seeds: One seed per matrix; its Gaussian test matrices depend only on the seed.
        vectors: Return ``U`` and ``Vh`` of the rank needed (else values only).
        settle: Values only: one acceptance test per matrix of its sketch's tail.
        energies: ||W||_F² of each matrix (required with ``settle``).
        rank_cap: Compute at most this many values per matrix (values only).
        min_width: Sketch at least this many columns (a spectrum report keeps
            ``min_width - oversample`` values even of a matrix that needs none).
        oversample: Columns p beyond the rank needed, and beyond the values trusted.
        power_iterations: Passes q of ``(W W^T)`` per block, each re-orthonormalized by QR.
        exact_fraction: The widest sketch, as a share of min(m, n), before the exact path.

    Returns:
        One :class:`Triplets` per matrix, in order; randomized ones carry their ``tail``
        when ``settle`` was given.
    """
    side = min(batch.shape[-2:])
    cap = min(rank_cap, side) if rank_cap is not None else None
    limit = min(cap + oversample, side) if cap is not None else int(exact_fraction * side)
    known = [need(np.empty(0)) for need in rank_of]
    rho = [math.inf] * len(batch)
    out: dict[int, Triplets] = {}
    rounds = math.ceil(limit / BLOCK) + 1  # the most rounds a sketch can take
    exact = [i for i, k in enumerate(known) if k is not None and k + oversample > limit and cap is None]
    pending = [i for i in range(len(batch)) if i not in exact]
    active = select_rows(batch, pending)
    sketch = _Sketch.empty(active, [seeds[i] for i in pending])
    while pending and sketch.width < limit:
        wanted = max((known[i] + oversample for i in pending if known[i] is not None), default=0)
        growing = settle is not None or any(known[i] is None for i in pending)
        step = max(wanted - sketch.width, BLOCK if growing else 1, min_width - sketch.width)
        block = min(step, limit - sketch.width)
        sketch = _grow(active, sketch, block, power_iterations)
        s, u_b, vh_b = _small_svd(sketch.b, vectors)
        # A sketch as wide as the smaller side spans the whole range: every value is exact.
        certain = sketch.width if sketch.width == side else sketch.width - oversample
        last = sketch.width == limit
        host = s.double().cpu().numpy()  # every value of every row, for the needs and the tails
        if settle is not None:
            energy = [energies[i] for i in pending]
            tails = _tails(active, sketch, host, certain, block, rounds, energy, rho, pending, power_iterations)
            tails = _settled(active, sketch, tails, [settle[i] for i in pending])
        for row, i in enumerate(pending):
            values = s[row, :certain]
            known[i] = rank_of[i](host[row, :certain])
            met = known[i] is not None and known[i] <= certain and (settle is None or tails[row].settled)
            if met:
                rank = known[i]
            elif last and cap is not None:
                values, rank = values[:cap], min(cap, certain)
            else:
                continue
            u = sketch.q[row] @ u_b[row, :, :rank] if vectors else None  # (m, rank)
            tail = tails[row].tail if settle is not None else None
            out[i] = Triplets(values, rank, u, vh_b[row, :rank] if vectors else None, "randomized", tail)
        keep = [row for row, i in enumerate(pending) if i not in out]
        pending = [pending[row] for row in keep]
        active, sketch = select_rows(active, keep), sketch.rows(keep)
    exact += pending
    if exact:
        rows = sorted(exact)
        found = exact_triplets(select_rows(batch, rows), [rank_of[i] for i in rows], vectors=vectors)
        out |= dict(zip(rows, found, strict=True))
    return [out[i] for i in range(len(batch))]


@dataclass
class _Checked:
    tail: Tail
    settled: bool = False


def _tails(
    active: torch.Tensor,
    sketch: _Sketch,
    values: np.ndarray,
    certain: int,
    block: int,
    rounds: int,
    energies: Sequence[float],
    rho: list[float],
    pending: list[int],
    power_iterations: int,
) -> list[_Checked]:
    """Each matrix's :class:`~lowrank_audit.bounds.Tail` after a round (coupling not yet known).

    The newest block was drawn against the residual before it, so its top value² times
    :func:`~lowrank_audit.bounds.spectral_bound_factor` bounds that residual's norm², and
    so the smaller one after it; ``rho`` keeps each matrix's least bound so far.
    """
    newest = torch.linalg.matrix_norm(sketch.b[:, -block:, :], ord=2).double().cpu().numpy()
    # rho is the least bound over all rounds, so each round gets a share of the failure
    # probability (union bound over at most `rounds` of them).
    factor = spectral_bound_factor(active.shape[-1], block, 2 * power_iterations + 2, FAILURE / rounds)
    out = []
    for row, i in enumerate(pending):
        top = float(newest[row]) ** 2
        rho[i] = min(rho[i], top * factor + rounding_slack(math.sqrt(top * energies[row])))
        residual = max(energies[row] - float(np.sum(np.square(values[row]))), 0.0) + rounding_slack(energies[row])
        out.append(_Checked(Tail(values[row], certain, residual, rho[i], UNKNOWN)))
    return out


def _settled(active: torch.Tensor, sketch: _Sketch, tails: list[_Checked], settle: Sequence[Settle]) -> list[_Checked]:
    """Which tails pass their test; the coupling pass runs only for those that would pass without it."""
    hopeful = [row for row, t in enumerate(tails) if settle[row](replace(t.tail, coupling=0.0))]
    if hopeful:
        w, q, b = select_rows(active, hopeful), select_rows(sketch.q, hopeful), select_rows(sketch.b, hopeful)
        z = w @ b.mT - q @ (b @ b.mT)  # (I - QQᵀ) W Bᵀ, (h, m, l)
        coupling = torch.linalg.matrix_norm(z, ord=2).double().cpu().numpy()
        norms = torch.linalg.matrix_norm(b).double().cpu().numpy()  # ||B||_F
        for j, row in enumerate(hopeful):
            # Rounding of the two products, at the scale ||W||_F ||B||_F.
            energy = tails[row].tail.residual + float(norms[j]) ** 2
            y = float(coupling[j]) + rounding_slack(math.sqrt(energy) * float(norms[j]))
            tails[row].tail = replace(tails[row].tail, coupling=y)
            tails[row].settled = settle[row](tails[row].tail)
    return tails


def select_rows(batch: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``batch[rows]`` without the copy that list indexing makes when every row is kept."""
    return batch if rows == list(range(len(batch))) else batch[rows]


__all__ = ["BLOCK", "EXACT_FRACTION", "FACTOR_OVERSAMPLE", "OVERSAMPLE", "POWER_ITERATIONS", "adaptive_svd",
           "select_rows"]  # fmt: skip
