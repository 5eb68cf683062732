"""Which tensors are audited, as which matrices, and how names map to layers and roles.

Rules (the README repeats them for users):

- Floating tensors with two or more dimensions are audited; 1-D tensors and integer or
  boolean tensors are skipped and listed with the reason.
- 2-D tensors are one matrix. 3-D tensors are stacked matrices (MoE experts), one row
  each. 4-D and higher (convolution kernels ``[out, in, kh, kw]``) are flattened to
  ``[out, in*kh*kw]``.
- A 1 x n matrix has one singular value (its norm) and is audited; an empty matrix (a side
  of 0) has none and is skipped.
- ``include``/``exclude`` are shell-style globs on the full tensor name.
- With a base checkpoint, the audited matrix is ``fine-tuned - base`` (kind ``delta``);
  names found on one side only are skipped and reported, different shapes are an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch

from lowrank_audit.errors import NoMatricesSelected, ShapeMismatchError
from lowrank_audit.io.checkpoint import Checkpoint, TensorInfo

_LAYER = re.compile(r"^\d+$")
_PARAM_SUFFIXES = ("weight",)


@dataclass(frozen=True)
class MatrixSpec:
    """One audited tensor: where it comes from and the matrices it is viewed as.

    ``count`` matrices of shape ``(rows, cols)``: ``count`` is the number of experts of
    a 3-D tensor and 1 otherwise.
    """

    name: str
    module: str
    role: str
    layer: int | None
    kind: str  # "weight", "delta", "activation" or "adapter"
    shape: tuple[int, ...]
    dtype: str
    rows: int
    cols: int
    count: int
    audited: tuple[int, int] | None = None  # when the engine reads a smaller matrix with the same spectrum

    @property
    def numel(self) -> int:
        return self.count * self.rows * self.cols

    @property
    def matrix(self) -> tuple[int, int]:
        """Rows and columns of the audited matrix: ``(rows, cols)``, except where the engine
        reads a stand-in with the same singular values: an activation's X (N x d) as its d x d
        Gram matrix, an adapter's update (out x in) as its r x r core (``audited``)."""
        if self.audited is not None:
            return self.audited
        return (self.shape[0], self.shape[1]) if self.kind == "activation" else (self.rows, self.cols)


@dataclass(frozen=True)
class Selection:
    """The outcome of selection: what is audited, and what is not, with reasons."""

    specs: tuple[MatrixSpec, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    unpaired: dict[str, str] = field(default_factory=dict)  # name -> "only in base" / "only in fine-tune"


def parse_name(name: str) -> tuple[str, str, int | None]:
    """Module path, role and layer index of a tensor name.

    Example:
        >>> parse_name("model.layers.3.self_attn.q_proj.weight")
        ('model.layers.3.self_attn.q_proj', 'q_proj', 3)
    """
    parts = name.split(".")
    module_parts = parts[:-1] if len(parts) > 1 and parts[-1] in _PARAM_SUFFIXES else parts
    layer = next((int(p) for p in module_parts if _LAYER.match(p)), None)
    return ".".join(module_parts), module_parts[-1], layer


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(count, rows, cols)`` under which a tensor of ``shape`` is audited."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    cols = 1
    for side in shape[1:]:
        cols *= side
    return 1, shape[0], cols


def _skip_reason(info: TensorInfo) -> str | None:
    if not info.is_floating:
        return f"not floating point ({info.dtype})"
    if len(info.shape) < 2:
        return f"{len(info.shape)}-D"
    _, rows, cols = matrix_view(info.shape)
    if rows * cols == 0:
        return f"empty matrix {rows}x{cols}"
    return None


def wanted(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatchcase(name, p) for p in exclude)


def select_matrices(
    ckpt: Checkpoint,
    *,
    base: Checkpoint | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Selection:
    """Decide which tensors of ``ckpt`` (or of ``ckpt - base``) are audited.

    Args:
        ckpt: The checkpoint to audit (the fine-tune, when ``base`` is given).
        base: Optional base checkpoint; tensors pair by name.
        include: Globs on tensor names; when given, only matching names are audited.
        exclude: Globs on tensor names never audited.

    Returns:
        A :class:`Selection` in sorted name order.

    Raises:
        ShapeMismatchError: A paired tensor has different shapes in the two checkpoints.
        NoMatricesSelected: Nothing is left to audit.
    """
    specs, skipped, unpaired = [], {}, {}
    names = [n for n in ckpt if wanted(n, include, exclude)]
    if base is not None:
        unpaired = {n: "only in fine-tune" for n in names if n not in base}
        unpaired |= {n: "only in base" for n in base if n not in ckpt and wanted(n, include, exclude)}
    for name in names:
        info = ckpt.info(name)
        if (reason := _skip_reason(info)) is not None:
            skipped[name] = reason
            continue
        if name in unpaired:
            continue
        if base is not None and base.info(name).shape != info.shape:
            raise ShapeMismatchError(
                f"tensor {name!r} has shape {list(info.shape)} in {info.file} "
                f"but {list(base.info(name).shape)} in base {base.info(name).file}"
            )
        count, rows, cols = matrix_view(info.shape)
        module, role, layer = parse_name(name)
        kind = "weight" if base is None else "delta"
        specs.append(MatrixSpec(name, module, role, layer, kind, info.shape, info.dtype, rows, cols, count))
    if not specs:
        where = f"{ckpt.path}" + (f" (with base {base.path})" if base is not None else "")
        hint = " with these --include/--exclude patterns" if include or exclude else ""
        raise NoMatricesSelected(f"{where}: no matrix to audit{hint}; {len(names)} tensors considered")
    return Selection(tuple(specs), skipped, dict(sorted(unpaired.items())))


def read_matrices(spec: MatrixSpec, ckpt: Checkpoint, base: Checkpoint | None, out: torch.Tensor) -> list[float]:
    """Write the matrices of ``spec`` into ``out``, a ``(count, rows, cols)`` float tensor.

    Half-precision and fp8 values are converted element by element as they are copied, so
    a delta is the difference of the exactly upcast stored values (up to ``out.dtype``
    rounding) and no full-size temporary is made.

    Returns:
        Each matrix's precision floor: the expected energy of rounding its stored values
        once (:func:`rounding_energy`), of both tensors for a delta.
    """
    stored = ckpt[spec.name].reshape(spec.count, spec.rows, spec.cols)
    out.copy_(stored)
    floors = rounding_energy(stored)
    if base is not None and spec.kind == "delta":
        stored = base[spec.name].reshape(spec.count, spec.rows, spec.cols)
        out.sub_(stored)
        floors = [a + b for a, b in zip(floors, rounding_energy(stored), strict=True)]
    return floors


# dtype -> (integer view, mantissa bits, exponent bias, exponent bits)
_LAYOUTS = {
    torch.float16: (torch.int16, 10, 15, 5),
    torch.bfloat16: (torch.int16, 7, 127, 8),
    torch.float32: (torch.int32, 23, 127, 8),
}


# Values read per matrix for its precision floor (64 rows of a 4096-wide matrix). The
# estimate is within 1 % of the rounding itself on Gaussian weights and within 10 % when a
# few outlier columns and rows hold much of the energy (tests/test_floor.py); reading every
# value cost 0.2 s of the 3 s audit of a LLaMA-7B layer's updates.
FLOOR_SAMPLE = 1 << 18


def rounding_energy(stored: torch.Tensor) -> list[float]:
    """Expected energy of rounding each matrix of a ``(count, rows, cols)`` stack to its dtype once.

    A value rounded to nearest moves by at most half its spacing (ulp) and, over many
    values, by ulp²/12 in square on average (uniform rounding error). The spacing of a
    float16, bfloat16 or float32 value is 2^(e - bias - mantissa bits) for its stored
    exponent field e (1 for subnormals), read from the bits. Of larger matrices every p-th
    row is read, p odd (no aliasing with power-of-two head or block layouts), about
    :data:`FLOOR_SAMPLE` values, and scaled up: whole rows keep every column's share exact
    and read memory in order, 12x faster than a strided sample of values. NaN and Inf count
    nothing. Other dtypes (float64, fp8) report 0: float64's floor is below
    anything measured here, and fp8 scaling is not modelled.
    """
    layout = _LAYOUTS.get(stored.dtype)
    if layout is None:
        return [0.0] * stored.shape[0]
    view, mantissa, bias, width = layout
    spacing = 4.0 ** (torch.arange(1 << width, dtype=torch.float64).clamp_min(1) - bias - mantissa) / 12
    spacing[-1] = 0.0  # NaN and Inf
    numel = stored[0].numel()
    step = math.ceil(numel / FLOOR_SAMPLE) | 1  # odd: no aliasing with power-of-two layouts
    out = []
    for matrix in stored:
        sample = matrix[::step].reshape(-1)
        field = (sample.view(view) >> mantissa) & ((1 << width) - 1)
        counts = torch.bincount(field.int(), minlength=1 << width).double()
        out.append(float(counts @ spacing) * numel / len(sample))
    return out


__all__ = ["MatrixSpec", "Selection", "matrix_view", "parse_name", "read_matrices", "rounding_energy",
           "select_matrices", "wanted"]  # fmt: skip
