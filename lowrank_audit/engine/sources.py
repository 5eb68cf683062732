"""Matrix sources: what the engine decomposes, as named matrices in plan order.

A source holds the :class:`~lowrank_audit.io.selection.MatrixSpec` of every matrix it
offers and fills a preallocated ``(count, rows, cols)`` buffer for one spec on request.
The engine's batch loop (:mod:`lowrank_audit.engine.batches`) knows nothing else about
where matrices come from, so a new kind of input (activation covariances, adapter
products, training snapshots) is a new source and never touches the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from lowrank_audit.io.activations import Moments
from lowrank_audit.io.adapters import Adapter, balance, core
from lowrank_audit.io.checkpoint import Checkpoint
from lowrank_audit.io.selection import MatrixSpec, parse_name, read_matrices


class MatrixSource(Protocol):
    """Named matrices for the engine.

    A source whose ``gram`` is True offers each matrix X as its Gram matrix G = XᵀX
    (``rows == cols == d``; the spec's ``shape`` is X's ``(N, d)``): the engine reads it in
    float64, takes ||X||_F² = trace(G) and σ(X) from the eigenvalues of G.
    """

    specs: tuple[MatrixSpec, ...]
    path: Path  # named in errors about a matrix
    gram: bool
    extras: dict[str, dict[str, Any]]  # report values a source measures while reading, by matrix name

    def read(self, spec: MatrixSpec, out: torch.Tensor) -> list[float]:
        """Fill ``out`` (count, rows, cols), already in the compute dtype, with the matrices of ``spec``.

        Returns each matrix's precision floor: the expected energy that rounding to the
        stored dtype put into it (0 where none is known)."""

    def stored_bytes(self, spec: MatrixSpec) -> int:
        """Bytes read from storage for ``spec`` (progress counts these)."""

    def release(self) -> None:
        """Drop memory maps of what was read so far; the engine calls it between batches."""


class CheckpointSource:
    """The weights of a checkpoint, or with ``base`` the updates ``W - W_base`` (kind ``delta``)."""

    def __init__(self, ckpt: Checkpoint, specs: Sequence[MatrixSpec], base: Checkpoint | None = None) -> None:
        self.ckpt, self.base, self.specs = ckpt, base, tuple(specs)
        self.path = ckpt.path
        self.gram = False
        self.extras: dict[str, dict[str, Any]] = {}

    def read(self, spec: MatrixSpec, out: torch.Tensor) -> list[float]:
        return read_matrices(spec, self.ckpt, self.base, out)

    def stored_bytes(self, spec: MatrixSpec) -> int:
        itemsize = torch.empty(0, dtype=getattr(torch, spec.dtype)).element_size()
        return spec.numel * itemsize * (2 if self.base is not None else 1)

    def release(self) -> None:
        self.ckpt.release()
        if self.base is not None:
            self.base.release()


class GramSource:
    """Activations: each module's input rows X (N x d), offered as G = XᵀX from their moments
    (:class:`~lowrank_audit.io.activations.Moments`), centered with ``center``."""

    def __init__(
        self, moments: Mapping[str, Moments], *, center: bool = False, path: Path = Path("activations")
    ) -> None:
        self.moments, self.center, self.path, self.gram = dict(moments), center, path, True
        self.specs = tuple(_activation_spec(m) for m in self.moments.values())
        self.extras: dict[str, dict[str, Any]] = {}

    def read(self, spec: MatrixSpec, out: torch.Tensor) -> list[float]:
        moments = self.moments[spec.name]
        # Rows with NaN/Inf were left out of the sums; the module is not decomposed (as a
        # matrix with NaN is not), and the analysis reports how many rows they were.
        out[0].copy_(moments.gram(center=self.center) if not moments.nonfinite else torch.nan)
        return [0.0]  # float64 sums of float32 activations: no floor that matters

    def stored_bytes(self, spec: MatrixSpec) -> int:
        return spec.rows * spec.cols * 8

    def release(self) -> None:
        return None


class AdapterSource:
    """The updates ΔW = scale · B A of a LoRA adapter, each offered as its r x r core (same
    singular values, :func:`lowrank_audit.io.adapters.core`): exact and cheap, and same-rank
    modules batch together. Reading a module also measures its factor balance (``extras``)."""

    def __init__(self, adapter: Adapter, specs: Sequence[MatrixSpec]) -> None:
        self.adapter, self.specs, self.path, self.gram = adapter, tuple(specs), adapter.path, False
        self.extras: dict[str, dict[str, Any]] = {}

    def read(self, spec: MatrixSpec, out: torch.Tensor) -> list[float]:
        module = self.adapter.modules[spec.name]
        b, a = self.adapter.factors(spec.name)
        c = core(b, a, module.scale)
        out[0].copy_(c.T if module.transposed else c)
        self.extras[spec.name] = balance(b, a) | {"adapter_rank": module.rank, "adapter_scale": module.scale}
        return [0.0]  # the factors' rounding is not modelled

    def stored_bytes(self, spec: MatrixSpec) -> int:
        module, weights = self.adapter.modules[spec.name], self.adapter.weights
        itemsize = torch.empty(0, dtype=getattr(torch, spec.dtype)).element_size()
        return sum(weights.info(n).numel for n in (module.a, module.b)) * itemsize

    def release(self) -> None:
        self.adapter.weights.release()


def _activation_spec(m: Moments) -> MatrixSpec:
    module, role, layer = parse_name(m.module)
    return MatrixSpec(m.module, module, role, layer, "activation", (m.count, m.width), "float64", m.width, m.width, 1)


__all__ = ["AdapterSource", "CheckpointSource", "GramSource", "MatrixSource"]
