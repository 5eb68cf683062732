"""The engine: same-shape matrices are stacked into memory-bounded batches and decomposed
in one batched call on the chosen device, exactly or by randomized truncated SVD.

Data flows one way: specs from :mod:`lowrank_audit.selection` are planned into batches
(:func:`plan_batches`), each batch is read, its squared Frobenius norms taken (which also
finds non-finite entries), decomposed and released before the next is read, and one
:class:`MatrixResult` per matrix is yielded.

Methods: ``exact`` is LAPACK/cuSOLVER ``svdvals``. ``randomized`` is Halko, Martinsson &
Tropp (SIAM Review 53(2), 2011), Algorithm 4.4 with re-orthonormalized power iterations;
for energy ranks the sketch grows block by block without recomputing (Yu, Gu & Li, SIAM
J. Matrix Anal. Appl. 39(2), 2018, randQB_EI) until its values hold the largest energy
target of every matrix, and decomposes exactly once it would pass a quarter of min(m, n).
``auto`` is exact for matrices whose smaller side is at most 1024, randomized above.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np
import torch

from lowrank_audit.checkpoint import Checkpoint
from lowrank_audit.errors import LowrankAuditError, OptionError
from lowrank_audit.metrics import ENERGY_TARGETS
from lowrank_audit.selection import MatrixSpec, read_matrices

DTYPES = {"float32": torch.float32, "float64": torch.float64}
METHODS = ("auto", "exact", "randomized")
DEFAULT_MAX_BATCH_MB = 256.0
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
# auto: below this smaller side an exact decomposition takes under a second on 2 CPU
# cores (1024 x 1024: about 0.4 s), so truncation is not worth its nulls.
AUTO_EXACT_SIDE = 1024


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. Build with :meth:`create` to validate user input once."""

    device: torch.device
    dtype: torch.dtype
    max_batch_bytes: int
    method: str = "exact"
    rank_cap: int | None = None
    seed: int = 0

    @classmethod
    def create(
        cls,
        *,
        device: str = "auto",
        dtype: str = "float32",
        max_batch_mb: float = DEFAULT_MAX_BATCH_MB,
        method: str = "auto",
        rank_cap: int | None = None,
        seed: int = 0,
    ) -> EngineConfig:
        """Validate options as a user spells them.

        Raises:
            OptionError: Unknown dtype or method, a CUDA device that is not present, a
                non-positive batch budget or rank cap, or a rank cap with ``exact``.
        """
        if dtype not in DTYPES:
            raise OptionError(f"dtype must be one of {', '.join(DTYPES)} but got {dtype!r}")
        if method not in METHODS:
            raise OptionError(f"method must be one of {', '.join(METHODS)} but got {method!r}")
        if not max_batch_mb > 0:
            raise OptionError(f"max-batch-mb must be positive but got {max_batch_mb}")
        if rank_cap is not None and rank_cap < 1:
            raise OptionError(f"rank-cap must be a positive integer but got {rank_cap}")
        if rank_cap is not None and method == "exact":
            raise OptionError("rank-cap limits the randomized method; use --method auto or randomized with it")
        dev = resolve_device(device)
        budget = int(max_batch_mb * 2**20)
        if dev.type == "cuda":
            # Batched SVD/QR workspaces on the device come to a few times the batch; a
            # quarter of what is free leaves room for them (not yet measured on a GPU).
            budget = min(budget, torch.cuda.mem_get_info(dev)[0] // 4)
        return cls(dev, DTYPES[dtype], budget, method, rank_cap, seed)

    @property
    def eps(self) -> float:
        return float(torch.finfo(self.dtype).eps)


@dataclass(frozen=True)
class MatrixResult:
    """The spectrum of one matrix: ``index`` is the expert of a 3-D tensor, else None."""

    spec: MatrixSpec
    index: int | None
    singular_values: np.ndarray | None  # (k,) float64, descending; None if not decomposed
    energy: float  # ||W||_F^2 in float64 (NaN when non-finite)
    nonfinite: int
    method: str  # exact, randomized, or skipped


@dataclass(frozen=True)
class Progress:
    """Cumulative progress, reported after each batch."""

    matrices_done: int
    matrices_total: int
    bytes_done: int
    bytes_total: int


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when present, else the CPU.

    Raises:
        OptionError: The name is not a device, or names a CUDA device that is absent.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise OptionError(f"device must be auto, cpu or cuda[:N] but got {device!r}") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise OptionError(
                f"device {device!r} is not available: this machine has {count} CUDA device(s); use --device cpu"
            )
    elif dev.type != "cpu":
        raise OptionError(f"device must be auto, cpu or cuda[:N] but got {device!r}")
    return dev


def plan_batches(specs: Sequence[MatrixSpec], *, itemsize: int, max_batch_bytes: int) -> list[list[MatrixSpec]]:
    """Group same-shape specs into batches of at most ``max_batch_bytes`` of matrices.

    Shapes are visited in sorted order and specs keep their order within a shape, so
    the plan is deterministic. A spec larger than the budget on its own (a big 3-D
    expert tensor) forms a batch of its own.
    """

    def shape(spec: MatrixSpec) -> tuple[int, int]:
        return spec.rows, spec.cols

    batches: list[list[MatrixSpec]] = []
    for _, group in groupby(sorted(specs, key=shape), key=shape):
        current: list[MatrixSpec] = []
        used = 0
        for spec in group:
            size = spec.numel * itemsize
            if current and used + size > max_batch_bytes:
                batches.append(current)
                current, used = [], 0
            current.append(spec)
            used += size
        batches.append(current)
    return batches


def singular_values(batch: torch.Tensor) -> torch.Tensor:
    """Exact singular values of a ``(b, m, n)`` stack, descending, shape ``(b, min(m, n))``."""
    # W and W^T share singular values, and LAPACK's gesdd is about twice as fast on the
    # tall orientation of a row-major wide matrix (benchmarks/README.md).
    return torch.linalg.svdvals(batch.mT if batch.shape[-2] < batch.shape[-1] else batch)


def squared_norms(batch: torch.Tensor) -> tuple[list[float], list[int]]:
    """``||W||_F^2`` and the NaN/Inf count of each matrix of a stack.

    Row norms in the batch's own dtype (pairwise sums: 3e-9 relative error measured on an
    11008 x 4096 float32 matrix) are squared and summed in float64, 20x faster than
    casting every entry to float64. A sum that is not finite (NaN, Inf, or an overflow of a
    row norm) is redone in float64, and only then are entries counted; a finite sum proves
    every entry finite.
    """
    energies = torch.linalg.vector_norm(batch, dim=-1).double().square().sum(dim=-1).tolist()
    counts = [0] * len(energies)
    for i, energy in enumerate(energies):
        if not np.isfinite(energy):
            energies[i] = float(torch.linalg.vector_norm(batch[i], dtype=torch.float64) ** 2)
            counts[i] = int((~torch.isfinite(batch[i])).sum())
    return energies, counts


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
        return _Sketch(_rows(self.q, rows), _rows(self.b, rows), [self.generators[i] for i in rows])


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
        active, sketch = _rows(active, keep), sketch.rows(keep)
    if pending:
        out |= dict(zip(pending, ((s, "exact") for s in singular_values(active)), strict=True))
    return [out[i] for i in range(len(batch))]


def _rows(batch: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``batch[rows]`` without the copy that list indexing makes when every row is kept."""
    return batch if rows == list(range(len(batch))) else batch[rows]


def _seed(seed: int, spec: MatrixSpec, index: int) -> int:
    # Per-matrix seeds from the run's seed and the matrix's identity, stable across runs
    # and batch plans (zlib.crc32 is deterministic, unlike hash()).
    return (seed * 1_000_003 + zlib.crc32(f"{spec.name}[{index}]".encode())) % 2**63


def _decompose(
    stack: torch.Tensor, finite: list[int], energies: list[float], seeds: list[int], config: EngineConfig
) -> dict[int, tuple[np.ndarray, str]]:
    """Singular values (float64, on the CPU) and method of the finite matrices of a batch, by row."""
    batch = _rows(stack, finite).to(config.device, non_blocking=True)  # pinned source on CUDA
    if _exact(config, min(batch.shape[-2:])) and config.rank_cap is None:
        decomposed = [(s, "exact") for s in singular_values(batch)]
    else:
        decomposed = adaptive_singular_values(
            batch, energies, max(ENERGY_TARGETS), seeds=seeds, rank_cap=config.rank_cap
        )
    return {i: (s.cpu().double().numpy(), method) for i, (s, method) in zip(finite, decomposed, strict=True)}


def _exact(config: EngineConfig, side: int) -> bool:
    return config.method == "exact" or (config.method == "auto" and side <= AUTO_EXACT_SIDE)


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
    specs: Sequence[MatrixSpec],
    ckpt: Checkpoint,
    *,
    base: Checkpoint | None = None,
    ranks: dict[str, int],
    config: EngineConfig,
) -> Iterator[Factors]:
    """Top singular triplets of every matrix of ``specs``, ``ranks[spec.name]`` of them.

    Batches as :func:`spectra` does (read in turn, one batch in memory). Exact where
    :func:`spectra` would be exact (``exact``, or ``auto`` at a smaller side up to 1024),
    so the factors there are the best rank-r approximation; randomized elsewhere, with
    the batch's largest rank and the same per-matrix seeds.

    Raises:
        LowrankAuditError: A matrix holds NaN or Inf.
    """
    itemsize = torch.empty(0, dtype=config.dtype).element_size()
    for batch_specs in plan_batches(specs, itemsize=itemsize, max_batch_bytes=config.max_batch_bytes):
        batch = _load(batch_specs, ckpt, base, config)
        for (spec, _), bad in zip(batch.identities, batch.nonfinite, strict=True):
            if bad:
                raise LowrankAuditError(f"{ckpt.path}: tensor {spec.name!r} has {bad} NaN/Inf entries, not factorized")
        stack = batch.stack.to(config.device, non_blocking=True)
        if _exact(config, min(stack.shape[-2:])):
            u, s, vh = torch.linalg.svd(stack, full_matrices=False)
            method = "exact"
        else:
            seeds = [_seed(config.seed, *identity) for identity in batch.identities]
            u, s, vh = truncated_svd(stack, max(ranks[spec.name] for spec in batch_specs), seeds=seeds)
            method = "randomized"
        for row, (spec, j) in enumerate(batch.identities):
            r = ranks[spec.name]
            # clone: a view would keep the whole batch's U and Vh alive.
            yield Factors(spec, j if len(spec.shape) == 3 else None, u[row, :, :r].cpu().clone(),
                          s[row, :r].cpu().clone(), vh[row, :r].cpu().clone(), method)  # fmt: skip
    ckpt.release()
    if base is not None:
        base.release()


def _stored_bytes(spec: MatrixSpec, with_base: bool) -> int:
    itemsize = torch.empty(0, dtype=getattr(torch, spec.dtype)).element_size()
    return spec.numel * itemsize * (2 if with_base else 1)


@dataclass
class _Loaded:
    """One batch read from disk: the stacked matrices and what was learned while reading."""

    specs: list[MatrixSpec]
    identities: list[tuple[MatrixSpec, int]]
    stack: torch.Tensor | None  # (b, m, n); dropped once decomposed
    energies: list[float]
    nonfinite: list[int]


def _load(batch_specs: list[MatrixSpec], ckpt: Checkpoint, base: Checkpoint | None, config: EngineConfig) -> _Loaded:
    """Read a batch into one preallocated (pinned, for CUDA) buffer; runs on the prefetch thread."""
    # The batch before this one is already copied out of the files: drop the memory maps
    # so the pages read for it stop counting as resident memory.
    ckpt.release()
    if base is not None:
        base.release()
    identities = [(spec, j) for spec in batch_specs for j in range(spec.count)]
    shape = (len(identities), batch_specs[0].rows, batch_specs[0].cols)
    stack = torch.empty(shape, dtype=config.dtype, pin_memory=config.device.type == "cuda")  # (b, m, n)
    row = 0
    for spec in batch_specs:
        read_matrices(spec, ckpt, base, stack[row : row + spec.count])
        row += spec.count
    energies, nonfinite = squared_norms(stack)
    return _Loaded(batch_specs, identities, stack, energies, nonfinite)


def _overlaps(config: EngineConfig) -> bool:
    """Whether reading the next batch overlaps the decomposition of this one."""
    return config.device.type == "cuda"


class _Deferred:
    """A read that runs when its result is asked for, in the calling thread."""

    def __init__(self, fn: Callable[..., _Loaded], *args: Any) -> None:
        self._fn, self._args = fn, args

    def result(self) -> _Loaded:
        return self._fn(*self._args)


class _InOrder:
    """The executor interface without a thread: each batch is read only once the previous
    one has been decomposed, so one batch is in memory at a time."""

    def __enter__(self) -> _InOrder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[..., _Loaded], *args: Any) -> _Deferred:
        return _Deferred(fn, *args)


def spectra(
    specs: Sequence[MatrixSpec],
    ckpt: Checkpoint,
    *,
    base: Checkpoint | None = None,
    config: EngineConfig,
    progress: Callable[[Progress], None] | None = None,
) -> Iterator[MatrixResult]:
    """Singular values of every matrix in ``specs``, batch by batch.

    On CUDA a background thread reads (and upcasts) the next batch while the device
    decomposes this one; with two batches in flight each gets half of
    ``config.max_batch_bytes``, so the budget holds for both together. On the CPU the
    decomposition already keeps every core busy and a reader thread only competes with
    it (15 % slower, benchmarks/README.md), so batches are read in turn with the whole
    budget. Matrices with NaN or Inf entries are counted and yielded without singular
    values; they do not stop the run.

    Yields:
        One :class:`MatrixResult` per matrix (per expert for 3-D tensors), grouped by
        batch; callers that need name order sort afterwards.
    """
    itemsize = torch.empty(0, dtype=config.dtype).element_size()
    overlap = _overlaps(config)
    budget = config.max_batch_bytes // 2 if overlap else config.max_batch_bytes
    plan = plan_batches(specs, itemsize=itemsize, max_batch_bytes=budget)
    totals = (sum(s.count for s in specs), sum(_stored_bytes(s, base is not None) for s in specs))
    done_matrices = done_bytes = 0
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowrank-audit-read") if overlap else _InOrder()
    with pool as reader:
        pending = reader.submit(_load, plan[0], ckpt, base, config) if plan else None
        for index in range(len(plan)):
            batch = pending.result()
            pending = reader.submit(_load, plan[index + 1], ckpt, base, config) if index + 1 < len(plan) else None
            finite = [i for i, n in enumerate(batch.nonfinite) if n == 0]
            seeds = [_seed(config.seed, *batch.identities[i]) for i in finite]
            energies = [batch.energies[i] for i in finite]
            values = _decompose(batch.stack, finite, energies, seeds, config) if finite else {}
            batch.stack = None  # free it before the reader fills the batch after next
            for row, (spec, j) in enumerate(batch.identities):
                s, method = values.get(row, (None, "skipped"))
                yield MatrixResult(spec, j if len(spec.shape) == 3 else None, s, batch.energies[row],
                                   batch.nonfinite[row], method)  # fmt: skip
            done_matrices += len(batch.identities)
            done_bytes += sum(_stored_bytes(s, base is not None) for s in batch.specs)
            if progress is not None:
                progress(Progress(done_matrices, totals[0], done_bytes, totals[1]))
    ckpt.release()
    if base is not None:
        base.release()


__all__ = [
    "DTYPES",
    "EngineConfig",
    "Factors",
    "MatrixResult",
    "Progress",
    "METHODS",
    "adaptive_singular_values",
    "factors",
    "squared_norms",
    "truncated_svd",
    "plan_batches",
    "resolve_device",
    "singular_values",
    "spectra",
]
