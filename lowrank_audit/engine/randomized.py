"""Randomized truncated SVD of a ``(b, m, n)`` stack: fixed rank, or grown to an energy target.

``truncated_svd`` is Halko, Martinsson & Tropp (SIAM Review 53(2), 2011), Algorithm 4.4
with re-orthonormalized power iterations. For energy ranks the sketch grows block by block
without recomputing (Yu, Gu & Li, SIAM J. Matrix Anal. Appl. 39(2), 2018, randQB_EI) until
its values hold the largest energy target of every matrix, and the rest is decomposed
exactly once the sketch would pass a quarter of min(m, n).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowrank_audit.engine.exact import singular_values

# Halko et al. 2011, section 4.2: oversampling p = 10 makes the top-k subspace reliable.
OVERSAMPLE = 10
# Section 4.5: q = 1 or 2 power iterations for slowly decaying spectra; tests/test_randomized.py
# shows q = 2 meets the float32 tolerance on decaying spectra and q = 0 does not.
POWER_ITERATIONS = 2
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


def truncated_svd(
    batch: torch.Tensor,
    rank: int,
    *,
    seeds: Sequence[int],
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized top-``rank`` SVD of a ``(b, m, n)`` stack (Halko et al. 2011, Alg. 4.4).

    Args:
        batch: Matrices of shape (b, m, n), float32 or float64, on any device.
        rank: Number of singular triplets wanted, k.
        seeds: One seed per matrix; its Gaussian test matrix depends only on the seed.
        oversample: Extra columns p of the sketch.
        power_iterations: Passes q of ``(W W^T)``, each re-orthonormalized by QR.

    Returns:
        ``U`` (b, m, k), ``S`` (b, k) descending, ``Vh`` (b, k, n), with k = min(rank, m, n).
    """
    width = min(rank + oversample, *batch.shape[-2:])
    sketch = _grow(batch, _Sketch.empty(batch, seeds), width, power_iterations)
    u_small, s, vh = torch.linalg.svd(sketch.b, full_matrices=False)  # (b, l, l), (b, l), (b, l, n)
    k = min(rank, width)
    return (sketch.q @ u_small)[..., :k], s[..., :k], vh[..., :k, :]


def adaptive_singular_values(
    batch: torch.Tensor,
    energies: Sequence[float],
    target: float,
    *,
    seeds: Sequence[int],
    rank_cap: int | None = None,
) -> list[tuple[torch.Tensor, str]]:
    """Top singular values of each matrix, enough to hold ``target`` of its energy.

    The sketch grows by ``BLOCK`` columns at a time, never recomputing what it has
    (randQB_EI, Yu, Gu & Li 2018): a matrix is done once the values of ``B = Q^T W``
    reach the target at some k with ``OVERSAMPLE`` columns to spare, and its top
    ``width - OVERSAMPLE`` values are returned. Those values never exceed the true ones
    (Cauchy interlacing), so a rank read from them is never below the exact rank. Once
    the width would pass a quarter of min(m, n) the rest are decomposed exactly, unless
    ``rank_cap`` is given: then the top ``rank_cap`` values are returned whether or not
    they reach the target.

    Returns:
        Per matrix, its singular values (descending) and the method that produced them.
    """
    side = min(batch.shape[-2:])
    cap = min(rank_cap, side) if rank_cap is not None else None
    limit = min(cap + OVERSAMPLE, side) if cap is not None else int(EXACT_FRACTION * side)
    out: dict[int, tuple[torch.Tensor, str]] = {}
    pending = list(range(len(batch)))
    active, sketch = batch, _Sketch.empty(batch, seeds)  # the rows of pending
    while pending and sketch.width < limit:
        sketch = _grow(active, sketch, min(BLOCK, limit - sketch.width), POWER_ITERATIONS)
        s = torch.linalg.svdvals(sketch.b.mT)  # (pending, width); tall orientation is faster
        captured = torch.cumsum(s.double() ** 2, dim=-1)
        last = sketch.width == limit
        for row, i in enumerate(pending):
            reached = int(torch.searchsorted(captured[row], target * energies[i])) + 1  # k holding the target
            if reached + OVERSAMPLE <= sketch.width:
                out[i] = (s[row, : sketch.width - OVERSAMPLE], "randomized")
            elif last and cap is not None:
                out[i] = (s[row, :cap], "randomized")
        keep = [row for row, i in enumerate(pending) if i not in out]
        pending = [pending[row] for row in keep]
        active, sketch = select_rows(active, keep), sketch.rows(keep)
    if pending:
        out |= dict(zip(pending, ((s, "exact") for s in singular_values(active)), strict=True))
    return [out[i] for i in range(len(batch))]


def select_rows(batch: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``batch[rows]`` without the copy that list indexing makes when every row is kept."""
    return batch if rows == list(range(len(batch))) else batch[rows]


__all__ = ["BLOCK", "EXACT_FRACTION", "OVERSAMPLE", "POWER_ITERATIONS", "adaptive_singular_values", "select_rows",
           "truncated_svd"]  # fmt: skip
