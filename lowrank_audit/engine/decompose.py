"""What the engine computes for every matrix of a source: spectra, and top singular triplets.

Data flows one way: a :class:`~lowrank_audit.engine.sources.MatrixSource` is streamed in
same-shape batches (:func:`lowrank_audit.engine.batches.stream`), each batch is
decomposed on the configured device, exactly (:mod:`~lowrank_audit.engine.exact`) or by
randomized truncated SVD (:mod:`~lowrank_audit.engine.randomized`), and one result per
matrix is yielded. ``auto`` is exact for matrices whose smaller side is at most 1024,
randomized above.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lowrank_audit.engine.batches import ProgressCallback, stream
from lowrank_audit.engine.config import EngineConfig
from lowrank_audit.engine.exact import singular_values, svd
from lowrank_audit.engine.randomized import adaptive_singular_values, select_rows, truncated_svd
from lowrank_audit.engine.sources import MatrixSource
from lowrank_audit.errors import LowrankAuditError
from lowrank_audit.io.selection import MatrixSpec
from lowrank_audit.metrics import ENERGY_TARGETS


@dataclass(frozen=True)
class MatrixResult:
    """The spectrum of one matrix: ``index`` is the expert of a 3-D tensor, else None."""

    spec: MatrixSpec
    index: int | None
    singular_values: np.ndarray | None  # (k,) float64, descending; None if not decomposed
    energy: float  # ||W||_F^2 in float64 (NaN when non-finite)
    nonfinite: int
    method: str  # exact, randomized, or skipped


def _seed(seed: int, spec: MatrixSpec, index: int) -> int:
    # Per-matrix seeds from the run's seed and the matrix's identity, stable across runs
    # and batch plans (zlib.crc32 is deterministic, unlike hash()).
    return (seed * 1_000_003 + zlib.crc32(f"{spec.name}[{index}]".encode())) % 2**63


def _decompose(
    stack: torch.Tensor, finite: list[int], energies: list[float], seeds: list[int], config: EngineConfig
) -> dict[int, tuple[np.ndarray, str]]:
    """Singular values (float64, on the CPU) and method of the finite matrices of a batch, by row."""
    batch = select_rows(stack, finite).to(config.device, non_blocking=True)  # pinned source on CUDA
    if config.exact_for(min(batch.shape[-2:])) and config.rank_cap is None:
        decomposed = [(s, "exact") for s in singular_values(batch)]
    else:
        decomposed = adaptive_singular_values(
            batch, energies, max(ENERGY_TARGETS), seeds=seeds, rank_cap=config.rank_cap
        )
    return {i: (s.cpu().double().numpy(), method) for i, (s, method) in zip(finite, decomposed, strict=True)}


def spectra(
    source: MatrixSource, config: EngineConfig, *, progress: ProgressCallback | None = None
) -> Iterator[MatrixResult]:
    """Singular values of every matrix of ``source``, batch by batch.

    Matrices with NaN or Inf entries are counted and yielded without singular values;
    they do not stop the run.

    Yields:
        One :class:`MatrixResult` per matrix (per expert for 3-D tensors), grouped by
        batch; callers that need name order sort afterwards.
    """
    for batch in stream(source, config, progress=progress):
        finite = [i for i, n in enumerate(batch.nonfinite) if n == 0]
        seeds = [_seed(config.seed, *batch.identities[i]) for i in finite]
        energies = [batch.energies[i] for i in finite]
        values = _decompose(batch.stack, finite, energies, seeds, config) if finite else {}
        batch.stack = None  # free it before the reader fills the batch after next
        for row, (spec, j) in enumerate(batch.identities):
            s, method = values.get(row, (None, "skipped"))
            yield MatrixResult(spec, batch.expert(spec, j), s, batch.energies[row], batch.nonfinite[row], method)


@dataclass(frozen=True)
class Factors:
    """Top-``rank`` singular triplets of one matrix, float (``config.dtype``) on the CPU."""

    spec: MatrixSpec
    index: int | None
    u: torch.Tensor  # (m, r)
    s: torch.Tensor  # (r,)
    vh: torch.Tensor  # (r, n)
    method: str


def factors(
    source: MatrixSource,
    ranks: dict[str, int],
    config: EngineConfig,
    *,
    progress: ProgressCallback | None = None,
) -> Iterator[Factors]:
    """Top singular triplets of every matrix of ``source``, ``ranks[spec.name]`` of them.

    Exact where :func:`spectra` would be exact (``exact``, or ``auto`` at a smaller side up
    to 1024), so the factors there are the best rank-r approximation; randomized
    elsewhere, with the batch's largest rank and the same per-matrix seeds.

    Raises:
        LowrankAuditError: A matrix holds NaN or Inf.
    """
    for batch in stream(source, config, progress=progress, stage="factors"):
        for (spec, _), bad in zip(batch.identities, batch.nonfinite, strict=True):
            if bad:
                raise LowrankAuditError(
                    f"{source.path}: tensor {spec.name!r} has {bad} NaN/Inf entries, not factorized"
                )
        stack = batch.stack.to(config.device, non_blocking=True)
        if config.exact_for(min(stack.shape[-2:])):
            u, s, vh = svd(stack)
            method = "exact"
        else:
            seeds = [_seed(config.seed, *identity) for identity in batch.identities]
            u, s, vh = truncated_svd(stack, max(ranks[spec.name] for spec in batch.specs), seeds=seeds)
            method = "randomized"
        batch.stack = stack = None
        for row, (spec, j) in enumerate(batch.identities):
            r = ranks[spec.name]
            # clone: a view would keep the whole batch's U and Vh alive.
            yield Factors(spec, batch.expert(spec, j), u[row, :, :r].cpu().clone(),
                          s[row, :r].cpu().clone(), vh[row, :r].cpu().clone(), method)  # fmt: skip


__all__ = ["Factors", "MatrixResult", "factors", "spectra"]
