"""What the engine computes for every matrix of a source: spectra, and top singular triplets.

Data flows one way: a :class:`~lowrank_audit.engine.sources.MatrixSource` is streamed in
same-shape batches (:func:`lowrank_audit.engine.batches.stream`), each batch is
decomposed on the configured device, exactly (:mod:`~lowrank_audit.engine.exact`) or by a
randomized sketch (:mod:`~lowrank_audit.engine.randomized`) as wide as each matrix's
:class:`~lowrank_audit.engine.needs.Need` asks, and one result per matrix is yielded.
``auto`` is exact for matrices whose smaller side is at most 1024, randomized above.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from lowrank_audit.bounds import Tail, settled
from lowrank_audit.engine.batches import Batch, ProgressCallback, stream
from lowrank_audit.engine.config import EngineConfig
from lowrank_audit.engine.exact import Triplets, exact_triplets, flip_signs, gram_triplets
from lowrank_audit.engine.needs import REPORT_NEED, Need
from lowrank_audit.engine.randomized import BLOCK, FACTOR_OVERSAMPLE, adaptive_svd, select_rows
from lowrank_audit.engine.sources import MatrixSource
from lowrank_audit.errors import LowrankAuditError
from lowrank_audit.io.selection import MatrixSpec


@dataclass(frozen=True)
class MatrixResult:
    """The spectrum of one matrix: ``index`` is the expert of a 3-D tensor, else None."""

    spec: MatrixSpec
    index: int | None
    singular_values: np.ndarray | None  # (k,) float64, descending; None if not decomposed
    energy: float  # ||W||_F^2 in float64 (NaN when non-finite)
    nonfinite: int
    method: str  # exact, randomized, or skipped
    floor: float = 0.0  # precision floor: expected energy of storage rounding
    tail: Tail | None = None  # what a randomized sketch proves about the values not computed


def nonfinite_refusal(name: str, count: int | None = None) -> str:
    """Why a matrix with NaN/Inf is not factorized, and the way past it (compress and its budget pass)."""
    held = f"{count:,} NaN/Inf entries" if count else "NaN/Inf entries"
    return f"tensor {name!r} has {held}, so it cannot be factorized; repair it, or leave it out with --exclude {name!r}"


def _seed(seed: int, spec: MatrixSpec, index: int) -> int:
    # Per-matrix seeds from the run's seed and the matrix's identity, stable across runs
    # and batch plans (zlib.crc32 is deterministic, unlike hash()).
    return (seed * 1_000_003 + zlib.crc32(f"{spec.name}[{index}]".encode())) % 2**63


def _decompose(
    batch: Batch, rows: list[int], need: Need, config: EngineConfig, *, vectors: bool, gram: bool = False
) -> list[Triplets]:
    """What ``need`` asks of the given rows of a batch, computed on the configured device."""
    if vectors and not config.exact_for(min(batch.specs[0].rows, batch.specs[0].cols)):
        # A sketch starts as wide as the largest rank asked in its call: matrices asking
        # different ranks (a budget's) go in separate calls, one at a time on the device, so
        # that each matrix's factors do not depend on its batch-mates (the batch plan,
        # --max-batch-mb, torchrun's shares).
        by_rank: dict[int | None, list[int]] = {}
        for i in rows:
            known = need(batch.identities[i][0], np.empty(0), energy=batch.energies[i], floor=batch.floors[i])
            by_rank.setdefault(known, []).append(i)
        if len(by_rank) > 1:
            found: dict[int, Triplets] = {}
            for part in by_rank.values():
                found |= dict(zip(part, _decompose(batch, part, need, config, vectors=True), strict=True))
            return [found[i] for i in rows]
    stack = select_rows(batch.stack, rows).to(config.device, non_blocking=True)  # pinned source on CUDA
    if gram:
        return gram_triplets(stack, [min(batch.identities[i][0].shape) for i in rows])
    specs = [batch.identities[i][0] for i in rows]
    pairs = list(zip(specs, rows, strict=True))
    rank_of = [partial(need, spec, energy=batch.energies[i], floor=batch.floors[i]) for spec, i in pairs]
    # rank_cap limits a spectrum; factors are asked for a rank and always get it.
    cap = None if vectors else config.rank_cap
    if config.exact_for(min(stack.shape[-2:])) and cap is None:
        return exact_triplets(stack, rank_of, vectors=vectors)
    seeds = [_seed(config.seed, *batch.identities[i]) for i in rows]
    if vectors:
        return adaptive_svd(stack, rank_of, seeds=seeds, vectors=True, oversample=FACTOR_OVERSAMPLE)
    # A report's sketch grows until its energy ranks are certified or lie in the noise
    # (lowrank_audit.bounds), and keeps the top BLOCK - p values at least.
    energies = [batch.energies[i] for i in rows]
    settle = [
        partial(settled, energy=batch.energies[i], floor=batch.floors[i], rows=spec.rows, cols=spec.cols,
                eps=config.eps)
        for spec, i in pairs
    ]  # fmt: skip
    return adaptive_svd(
        stack, rank_of, seeds=seeds, vectors=False, settle=settle, energies=energies, rank_cap=cap, min_width=BLOCK
    )


def spectra(
    source: MatrixSource,
    config: EngineConfig,
    *,
    need: Need = REPORT_NEED,
    progress: ProgressCallback | None = None,
) -> Iterator[MatrixResult]:
    """Singular values of every matrix of ``source``, batch by batch.

    Exact matrices get every value; randomized ones the top values, at least as many as
    ``need`` asks, and enough that each energy rank of the report is certified within
    1 % or lies in the noise floor (:func:`lowrank_audit.bounds.settled`), with the
    sketch's :class:`~lowrank_audit.bounds.Tail`. Matrices with NaN or Inf entries are
    counted and yielded without singular values; they do not stop the run.

    Yields:
        One :class:`MatrixResult` per matrix (per expert for 3-D tensors), grouped by
        batch; callers that need name order sort afterwards.
    """
    for batch in stream(source, config, progress=progress):
        finite = [i for i, n in enumerate(batch.nonfinite) if n == 0]
        found = _decompose(batch, finite, need, config, vectors=False, gram=source.gram) if finite else []
        values = {i: (t.s.cpu().double().numpy(), t.method, t.tail) for i, t in zip(finite, found, strict=True)}
        batch.stack = None  # free it before the reader fills the batch after next
        for row, (spec, j) in enumerate(batch.identities):
            s, method, tail = values.get(row, (None, "skipped", None))
            yield MatrixResult(spec, batch.expert(spec, j), s, batch.energies[row], batch.nonfinite[row], method,
                               batch.floors[row], tail)  # fmt: skip


@dataclass(frozen=True)
class Factors:
    """Top singular triplets of one matrix, float (``config.dtype``) on the CPU.

    Signs follow :func:`~lowrank_audit.engine.exact.flip_signs`: the largest-magnitude
    entry of each column of ``u`` is positive.
    """

    spec: MatrixSpec
    index: int | None
    u: torch.Tensor  # (m, r)
    s: torch.Tensor  # (r,)
    vh: torch.Tensor  # (r, n)
    method: str


def factors(
    source: MatrixSource,
    need: Need,
    config: EngineConfig,
    *,
    progress: ProgressCallback | None = None,
) -> Iterator[Factors]:
    """Top singular triplets of every matrix of ``source``, as many as ``need`` says, in one pass.

    A rank known up front (:class:`~lowrank_audit.engine.needs.RankNeed`) costs one
    randomized sketch of rank + 10 columns; an energy target grows the sketch until the
    top values hold it. Exact where :func:`spectra` would be exact (``exact``, or ``auto``
    at a smaller side up to 1024) and wherever the sketch would pass a quarter of the
    smaller side; the factors there are the best rank-r approximation.

    Raises:
        LowrankAuditError: A matrix holds NaN or Inf.
    """
    for batch in stream(source, config, progress=progress, stage="factors"):
        for (spec, _), bad in zip(batch.identities, batch.nonfinite, strict=True):
            if bad:
                raise LowrankAuditError(f"{source.path}: {nonfinite_refusal(spec.name, bad)}")
        found = _decompose(batch, list(range(len(batch.identities))), need, config, vectors=True)
        batch.stack = None
        for (spec, j), t in zip(batch.identities, found, strict=True):
            u, vh = flip_signs(t.u, t.vh)
            # clone: a view would keep the whole batch's U and Vh alive.
            yield Factors(spec, batch.expert(spec, j), u.cpu().clone(), t.s[: t.rank].cpu().clone(),
                          vh.cpu().clone(), t.method)  # fmt: skip


__all__ = ["Factors", "MatrixResult", "factors", "nonfinite_refusal", "spectra"]
