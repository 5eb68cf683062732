"""Activations in: raw dumps of a module's inputs, or their moments, streamed in bounded chunks.

Two file kinds, told apart by the safetensors header metadata:

- **Dumps**: tensors named by module path (``model.layers.0.mlp.down_proj``) holding that
  module's inputs, shape ``[N, d]`` or ``[B, T, d]`` (read as ``[B*T, d]``). Several files
  of one run are shards: a module's rows concatenate across them.
- **Moments** (``{"format": "lowrank-audit.moments/1"}`` in the metadata): per module,
  ``<module>.xtx`` float64 ``[d, d]`` (XᵀX), ``<module>.sum`` float64 ``[d]`` (the row sum)
  and ``<module>.count`` int64 ``[]`` (the rows), plus ``<module>.nonfinite`` int64 ``[]``
  (rows left out because they held NaN or Inf). A billion-row calibration run is
  ``8 d²`` bytes per module. Moments of several files add up.

Dumps are read ``CHUNK_ROWS`` rows at a time through safetensors' memory-mapped slices, so
memory never scales with N; each chunk's XᵀX is a float64 rank-k update (``torch.addmm``
into the float64 accumulator; float32 inputs are upcast per chunk, so the sum is exact to
float64 rounding, about 1e-16 · N relative).
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_audit.errors import CheckpointError
from lowrank_audit.io.outputs import atomic_file

FORMAT = "lowrank-audit.moments/1"
METADATA_KEY = "lowrank_audit"
# Rows per chunk: 65,536 rows of a 4096-wide float32 activation are 1 GiB upcast to float64;
# the budget below keeps a chunk at 64 MiB of float64 whatever d is.
CHUNK_BYTES = 64 * 2**20
_PARTS = ("xtx", "sum", "count", "nonfinite")


@dataclass
class Moments:
    """Sufficient statistics of one module's input rows X (N x d): XᵀX, the row sum, N.

    Rows holding NaN or Inf are not added; ``nonfinite`` counts them.
    """

    module: str
    xtx: torch.Tensor  # (d, d) float64
    total: torch.Tensor  # (d,) float64
    count: int
    nonfinite: int = 0

    @classmethod
    def empty(cls, module: str, width: int) -> Moments:
        zeros = torch.zeros(width, width, dtype=torch.float64)
        return cls(module, zeros, torch.zeros(width, dtype=torch.float64), 0)

    @property
    def width(self) -> int:
        return self.xtx.shape[0]

    def add(self, rows: torch.Tensor) -> None:
        """Accumulate a chunk of rows, shape ``(k, d)`` or ``(..., d)``, any float dtype."""
        rows = rows.reshape(-1, rows.shape[-1]).to(torch.float64)
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            rows = rows[finite]
        self.xtx.addmm_(rows.T, rows)
        self.total += rows.sum(dim=0)
        self.count += rows.shape[0]

    def merge(self, other: Moments) -> None:
        self.xtx += other.xtx
        self.total += other.total
        self.count += other.count
        self.nonfinite += other.nonfinite

    def gram(self, *, center: bool = False) -> torch.Tensor:
        """XᵀX, or with ``center`` the centered Gram (X - 1μᵀ)ᵀ(X - 1μᵀ) = XᵀX - N μμᵀ."""
        if not center or self.count == 0:
            return self.xtx
        mean = self.total / self.count
        return self.xtx - self.count * torch.outer(mean, mean)


def is_moments(path: Path) -> bool:
    """Whether a safetensors file holds moments (else it is read as a dump)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get(METADATA_KEY)
    return bool(meta) and json.loads(meta).get("format") == FORMAT


def _read_moments(path: Path, wanted: Container[str] | None = None) -> dict[str, Moments]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = [n for n in f.keys() if wanted is None or n.rpartition(".")[0] in wanted]  # noqa: SIM118
        tensors = {n: f.get_tensor(n) for n in names}
    modules = sorted({name.rpartition(".")[0] for name in tensors})
    out = {}
    for module in modules:
        _missing_part(path, module, tensors)
        parts = {p: tensors.get(f"{module}.{p}") for p in _PARTS}
        xtx, total = parts["xtx"].to(torch.float64), parts["sum"].to(torch.float64)
        if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1] or total.shape != (xtx.shape[0],):
            raise CheckpointError(f"{path}: module {module!r}: .xtx must be [d, d] and .sum [d]")
        nonfinite = int(parts["nonfinite"]) if parts["nonfinite"] is not None else 0
        out[module] = Moments(module, xtx, total, int(parts["count"]), nonfinite)
    return out


def _check_dump(path: Path, module: str, shape: Sequence[int], dtype: str) -> None:
    if len(shape) not in (2, 3) or dtype not in ("F64", "F32", "F16", "BF16"):
        raise CheckpointError(
            f"{path}: tensor {module!r} is not activations: need a float [N, d] or [B, T, d], got {dtype} {list(shape)}"
        )


def _missing_part(path: Path, module: str, names: Container[str]) -> None:
    if any(f"{module}.{p}" not in names for p in ("xtx", "sum", "count")):
        raise CheckpointError(f"{path}: module {module!r} lacks one of .xtx, .sum, .count")


def _chunk_rows(width: int) -> int:
    return max(1, CHUNK_BYTES // (8 * width))


def _read_dump(path: Path, into: dict[str, Moments], wanted: Container[str] | None = None) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        layout = {m: (f.get_slice(m).get_shape(), f.get_slice(m).get_dtype()) for m in f.keys()}  # noqa: SIM118
    for module, (shape, dtype) in layout.items():
        if wanted is not None and module not in wanted:
            continue
        _check_dump(path, module, shape, dtype)
        width = shape[-1]
        moments = into.setdefault(module, Moments.empty(module, width))
        if moments.width != width:
            raise CheckpointError(
                f"{path}: module {module!r} has width {width} here but {moments.width} in an earlier file"
            )
        # A chunk of whole leading rows: a [B, T, d] dump is read B-slices at a time. The file
        # is mapped afresh for each chunk, so pages read for one chunk stop counting as
        # resident memory once it is added (a map held open keeps every page it touched).
        step = max(1, _chunk_rows(width) // (1 if len(shape) == 2 else max(shape[1], 1)))
        for start in range(0, shape[0], step):
            with safe_open(str(path), "pt") as f:
                chunk = f.get_slice(module)[start : start + step]
            moments.add(chunk)
            del chunk


def activation_layout(paths: Sequence[str | Path]) -> dict[str, tuple[int, int]]:
    """Module -> (rows N, width d) over all files, from their headers (and each moments file's
    row counts) without reading the rows: what a plan needs to share modules among processes.

    Raises:
        CheckpointError: A file is missing or its header unreadable, a dump's tensor is not
            ``[N, d]``/``[B, T, d]`` floats, or a moments module lacks a part.
    """
    from safetensors import safe_open

    out: dict[str, tuple[int, int]] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such activation file")
        try:
            moments = is_moments(path)
            with safe_open(str(path), "pt") as f:
                names = set(f.keys())
                for name in sorted(names):
                    shape = f.get_slice(name).get_shape()
                    if moments:
                        module = name.rpartition(".")[0]
                        _missing_part(path, module, names)
                        if not name.endswith(".xtx"):
                            continue  # the module's other parts; their shapes are checked when read
                        held = f.get_tensor(f"{module}.count")
                        rows = int(held) if held.numel() == 1 else 0  # a bad count fails when read
                    else:
                        _check_dump(path, name, shape, f.get_slice(name).get_dtype())
                        module, rows = name, math.prod(shape[:-1])
                    width = shape[-1] if shape else 0
                    known = out.get(module, (0, width))
                    out[module] = (known[0] + rows, known[1])
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own types for bad headers
            raise CheckpointError(f"{path}: cannot read activations: {' '.join(str(exc).split())}") from exc
    return dict(sorted(out.items()))


def read_activations(paths: Sequence[str | Path], modules: Container[str] | None = None) -> dict[str, Moments]:
    """The moments of every module (or of ``modules`` only) over all files, dumps streamed in bounded chunks.

    Args:
        paths: Safetensors files: dumps (shards of one run) or moments, in any mix.
        modules: Read only these modules' rows (a process's share under torchrun); None: all.

    Returns:
        Module path -> :class:`Moments`, sorted by module.

    Raises:
        CheckpointError: A file is missing or unreadable, a tensor is not ``[N, d]``/``[B, T, d]``
            floats, or a module's width differs between files; the message names the file and module.
    """
    out: dict[str, Moments] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such activation file")
        try:
            if is_moments(path):
                for module, moments in _read_moments(path, modules).items():
                    if module in out and out[module].width != moments.width:
                        raise CheckpointError(f"{path}: module {module!r} has width {moments.width} "
                                              f"here but {out[module].width} in an earlier file")  # fmt: skip
                    out.setdefault(module, Moments.empty(module, moments.width)).merge(moments)
            else:
                _read_dump(path, out, modules)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own types for bad headers and data
            raise CheckpointError(f"{path}: cannot read activations: {exc}") from exc
    empty = [m for m, moments in out.items() if moments.count + moments.nonfinite == 0]
    if empty:
        raise CheckpointError(f"{', '.join(map(str, paths))}: module {empty[0]!r} has no activation rows")
    return dict(sorted(out.items()))


def write_moments(moments: Iterable[Moments], path: str | Path, *, force: bool = False) -> Path:
    """Write moments in the documented layout (module docstring), atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for m in moments:
        tensors[f"{m.module}.xtx"] = m.xtx.contiguous()
        tensors[f"{m.module}.sum"] = m.total.contiguous()
        tensors[f"{m.module}.count"] = torch.tensor(m.count, dtype=torch.int64)
        tensors[f"{m.module}.nonfinite"] = torch.tensor(m.nonfinite, dtype=torch.int64)
    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps({"format": FORMAT})})
    return path


def write_dumps(rows: Mapping[str, torch.Tensor], path: str | Path, *, force: bool = False) -> Path:
    """Write raw dumps (module docstring): one ``[N, d]`` tensor per module path, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        save_file({name: t.contiguous() for name, t in sorted(rows.items())}, tmp)
    return path


__all__ = ["CHUNK_BYTES", "FORMAT", "Moments", "activation_layout", "is_moments", "read_activations", "write_dumps",
           "write_moments"]  # fmt: skip
