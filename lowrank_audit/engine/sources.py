"""Matrix sources: what the engine decomposes, as named matrices in plan order.

A source holds the :class:`~lowrank_audit.io.selection.MatrixSpec` of every matrix it
offers and fills a preallocated ``(count, rows, cols)`` buffer for one spec on request.
The engine's batch loop (:mod:`lowrank_audit.engine.batches`) knows nothing else about
where matrices come from, so a new kind of input (activation covariances, adapter
products, training snapshots) is a new source and never touches the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from lowrank_audit.io.checkpoint import Checkpoint
from lowrank_audit.io.selection import MatrixSpec, read_matrices


class MatrixSource(Protocol):
    """Named matrices for the engine."""

    specs: tuple[MatrixSpec, ...]
    path: Path  # named in errors about a matrix

    def read(self, spec: MatrixSpec, out: torch.Tensor) -> None:
        """Fill ``out`` (count, rows, cols), already in the compute dtype, with the matrices of ``spec``."""

    def stored_bytes(self, spec: MatrixSpec) -> int:
        """Bytes read from storage for ``spec`` (progress counts these)."""

    def release(self) -> None:
        """Drop memory maps of what was read so far; the engine calls it between batches."""


class CheckpointSource:
    """The weights of a checkpoint, or with ``base`` the updates ``W - W_base`` (kind ``delta``)."""

    def __init__(self, ckpt: Checkpoint, specs: Sequence[MatrixSpec], base: Checkpoint | None = None) -> None:
        self.ckpt, self.base, self.specs = ckpt, base, tuple(specs)
        self.path = ckpt.path

    def read(self, spec: MatrixSpec, out: torch.Tensor) -> None:
        read_matrices(spec, self.ckpt, self.base, out)

    def stored_bytes(self, spec: MatrixSpec) -> int:
        itemsize = torch.empty(0, dtype=getattr(torch, spec.dtype)).element_size()
        return spec.numel * itemsize * (2 if self.base is not None else 1)

    def release(self) -> None:
        self.ckpt.release()
        if self.base is not None:
            self.base.release()


__all__ = ["CheckpointSource", "MatrixSource"]
