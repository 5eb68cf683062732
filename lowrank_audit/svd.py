"""The engine: same-shape matrices are stacked into memory-bounded batches and decomposed
in one batched call on the chosen device.

Data flows one way: specs from :mod:`lowrank_audit.selection` are planned into batches
(:func:`plan_batches`), each batch is read, checked for non-finite entries, decomposed
(:func:`singular_values`) and released before the next is read, and one
:class:`MatrixResult` per matrix is yielded. Only singular values leave the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch

from lowrank_audit.checkpoint import Checkpoint
from lowrank_audit.errors import OptionError
from lowrank_audit.selection import MatrixSpec, read_matrices

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MAX_BATCH_MB = 256.0


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. Build with :meth:`create` to validate user input once."""

    device: torch.device
    dtype: torch.dtype
    max_batch_bytes: int

    @classmethod
    def create(
        cls, *, device: str = "auto", dtype: str = "float32", max_batch_mb: float = DEFAULT_MAX_BATCH_MB
    ) -> EngineConfig:
        """Validate options as a user spells them.

        Raises:
            OptionError: Unknown dtype, a CUDA device that is not present, or a
                non-positive batch budget.
        """
        if dtype not in DTYPES:
            raise OptionError(f"dtype must be one of {', '.join(DTYPES)} but got {dtype!r}")
        if not max_batch_mb > 0:
            raise OptionError(f"max-batch-mb must be positive but got {max_batch_mb}")
        return cls(resolve_device(device), DTYPES[dtype], int(max_batch_mb * 2**20))

    @property
    def eps(self) -> float:
        return float(torch.finfo(self.dtype).eps)


@dataclass(frozen=True)
class MatrixResult:
    """The spectrum of one matrix: ``index`` is the expert of a 3-D tensor, else None."""

    spec: MatrixSpec
    index: int | None
    singular_values: np.ndarray | None  # (k,) float64, descending; None if not decomposed
    nonfinite: int
    method: str


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


def count_nonfinite(batch: torch.Tensor) -> list[int]:
    """NaN and Inf entries of each matrix of a ``(b, m, n)`` stack."""
    # A finite sum proves every entry finite (NaN and Inf propagate) at the cost of one
    # read; only a matrix whose sum is not finite (or overflowed) is counted entry by entry.
    sums = batch.sum(dim=(1, 2))
    counts = [0] * len(batch)
    for i in torch.nonzero(~torch.isfinite(sums)).flatten().tolist():
        counts[i] = int((~torch.isfinite(batch[i])).sum())
    return counts


def _stored_bytes(spec: MatrixSpec, with_base: bool) -> int:
    itemsize = torch.empty(0, dtype=getattr(torch, spec.dtype)).element_size()
    return spec.numel * itemsize * (2 if with_base else 1)


def spectra(
    specs: Sequence[MatrixSpec],
    ckpt: Checkpoint,
    *,
    base: Checkpoint | None = None,
    config: EngineConfig,
    progress: Callable[[Progress], None] | None = None,
) -> Iterator[MatrixResult]:
    """Singular values of every matrix in ``specs``, batch by batch.

    Matrices with NaN or Inf entries are counted and yielded without singular values;
    they do not stop the run.

    Yields:
        One :class:`MatrixResult` per matrix (per expert for 3-D tensors), grouped by
        batch; callers that need name order sort afterwards.
    """
    itemsize = torch.empty(0, dtype=config.dtype).element_size()
    totals = (sum(s.count for s in specs), sum(_stored_bytes(s, base is not None) for s in specs))
    done_matrices = done_bytes = 0
    for batch_specs in plan_batches(specs, itemsize=itemsize, max_batch_bytes=config.max_batch_bytes):
        stack = torch.cat([read_matrices(s, ckpt, base, config.dtype) for s in batch_specs])  # (b, m, n)
        nonfinite = count_nonfinite(stack)
        finite = [i for i, n in enumerate(nonfinite) if n == 0]
        values: dict[int, np.ndarray] = {}
        if finite:
            chosen = stack if len(finite) == len(stack) else stack[finite]
            s = singular_values(chosen.to(config.device)).cpu().double().numpy()  # (b, min(m, n))
            values = dict(zip(finite, s, strict=True))
        del stack
        row = 0
        for spec in batch_specs:
            for j in range(spec.count):
                index = j if len(spec.shape) == 3 else None
                yield MatrixResult(spec, index, values.get(row), int(nonfinite[row]), "exact")
                row += 1
        done_matrices += sum(s.count for s in batch_specs)
        done_bytes += sum(_stored_bytes(s, base is not None) for s in batch_specs)
        if progress is not None:
            progress(Progress(done_matrices, totals[0], done_bytes, totals[1]))


__all__ = [
    "DTYPES",
    "EngineConfig",
    "MatrixResult",
    "Progress",
    "count_nonfinite",
    "plan_batches",
    "resolve_device",
    "singular_values",
    "spectra",
]
