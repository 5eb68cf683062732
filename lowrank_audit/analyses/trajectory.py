"""``trajectory``: how singular values and singular vectors move across training checkpoints.

Snapshots are read one matrix at a time, in the order given (a quoted glob is expanded and
sorted by the step number in the names), so memory holds one matrix per checkpoint read and
the reference vectors, never every checkpoint. For each matrix and checkpoint t the matrix
is W(t), or with ``delta="base"`` W(t) − W(0) (W(0) the ``base`` checkpoint, else the first),
or with ``delta="consecutive"`` the step W(t) − W(t−1). Each is decomposed exactly, in
float64 on the CPU (snapshots of small models and single layers; a 4096-wide matrix takes
seconds), and gives one row:

- ``singular_values``: the top ``top_k``, descending.
- ``u_angles``/``v_angles``: degrees between the i-th left/right singular vector at t and at
  the first row, sign-invariant (arccos |⟨u_i(t), u_i(0)⟩|). A vector is defined only where
  its value is separated from its neighbours: the angle is null unless the relative gap
  min(σ_{i−1} − σ_i, σ_i − σ_{i+1}) / σ₁ exceeds :data:`IDENTIFIABLE_GAP` at both ends (an
  orthogonal initialization has all values equal, and no individual vectors).
- ``subspace_angle``: the largest principal angle (degrees) between the top-r left and
  right singular subspaces at t and at the last checkpoint (the larger of the two sides),
  r = ``subspace_rank`` or the last checkpoint's k95.
- ``settling_step``: per matrix, the first step from which ``subspace_angle`` stays at or
  below ``settle_degrees`` to the end.
"""

from __future__ import annotations

import glob
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from lowrank_audit.analyses.alignment import largest_principal_angle
from lowrank_audit.distributed import current
from lowrank_audit.errors import OptionError, ShapeMismatchError
from lowrank_audit.formats.report import build_frame, schema_of
from lowrank_audit.io.checkpoint import open_checkpoint
from lowrank_audit.io.provenance import hashing_inputs, merge_inputs, provenance
from lowrank_audit.io.selection import MatrixSpec, select_matrices
from lowrank_audit.metrics import energy_rank

IDENTIFIABLE_GAP = 0.01  # of σ₁: below it a singular vector is not defined by its matrix
DEFAULT_TOP_K = 8
DEFAULT_SETTLE_DEGREES = 5.0
DEFAULT_STEP_REGEX = r"(\d+)(?!.*\d)"  # the last integer in the file name
DELTAS = ("base", "consecutive")

TRAJECTORY_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("name", pa.string(), "tensor name"),
    ("module", pa.string(), "module path"),
    ("layer", pa.int64(), "first integer component of the name (null when none)"),
    ("role", pa.string(), "last component of the module path"),
    ("expert", pa.int64(), "index of the matrix in a 3-D tensor (null otherwise)"),
    ("checkpoint", pa.string(), "checkpoint path as given"),
    ("index", pa.int64(), "position of the checkpoint in the order read (0 = first)"),
    ("step", pa.int64(), "training step read from the file name (null when none)"),
    ("kind", pa.string(), "weight W(t), delta W(t) - W(0), or step W(t) - W(t-1)"),
    ("rows", pa.int64(), "rows of the matrix"),
    ("cols", pa.int64(), "columns of the matrix"),
    ("frobenius_norm", pa.float64(), "||M(t)||_F"),
    ("singular_values", pa.list_(pa.float64()), "the top-k singular values at t, descending"),
    ("u_angles", pa.list_(pa.float64()), "degrees between u_i(t) and u_i at the first row (null: not identifiable)"),
    ("v_angles", pa.list_(pa.float64()), "degrees between v_i(t) and v_i at the first row (null: not identifiable)"),
    ("subspace_rank", pa.int64(), "r of the subspace angle: --subspace-rank, or the last checkpoint's k95"),
    ("subspace_angle", pa.float64(), "largest principal angle (degrees): top-r subspaces at t and at the end"),
    ("settling_step", pa.int64(), "first step from which subspace_angle stays within --settle-degrees (null: never)"),
)  # fmt: skip
TRAJECTORY_SCHEMA = schema_of(TRAJECTORY_COLUMNS)


def checkpoint_order(
    paths: Sequence[str | Path], step_regex: str = DEFAULT_STEP_REGEX
) -> list[tuple[Path, int | None]]:
    """``(path, step)`` in reading order: paths as given; a pattern that names no file is
    expanded as a glob and its matches sorted by step (then name).

    Raises:
        OptionError: A glob matches nothing, or the step regex is invalid.
    """
    try:
        pattern = re.compile(step_regex)
    except re.error as exc:
        raise OptionError(f"--step-regex {step_regex!r} is not a regular expression: {exc}") from None

    def step(path: Path) -> int | None:
        # The whole path: Hugging Face trainers write checkpoint-700/model.safetensors.
        found = pattern.search(str(path))
        text = (found[1] if found.groups() else found[0]) if found else None
        if found and (text is None or not text.isdigit()):
            raise OptionError(f"--step-regex {step_regex!r} must capture the step's digits ({path}: {text!r})")
        return int(text) if text else None

    out = []
    for given in paths:
        path = Path(given)
        if path.exists() or not glob.has_magic(str(given)):
            out.append((path, step(path)))
            continue
        matches = [Path(m) for m in glob.glob(str(given))]
        if not matches:
            raise OptionError(f"{given}: no checkpoint matches this pattern")
        keyed = sorted(matches, key=lambda p: (step(p) is None, step(p) or 0, str(p)))
        out += [(p, step(p)) for p in keyed]
    if len(out) < 2:
        raise OptionError("a trajectory needs at least two checkpoints")
    return out


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u, s, vh.T


def _identifiable(s: torch.Tensor, k: int) -> list[bool]:
    scale = float(s[0]) if len(s) and s[0] > 0 else 0.0
    out = []
    for i in range(k):
        above = float(s[i - 1] - s[i]) if i > 0 else math.inf
        below = float(s[i] - s[i + 1]) if i + 1 < len(s) else float(s[i])
        out.append(scale > 0 and min(above, below) > IDENTIFIABLE_GAP * scale)
    return out


def _angles(x: torch.Tensor, ref: torch.Tensor, ok: list[bool]) -> list[float | None]:
    """Sign-invariant degrees between matching unit columns: 2 asin(‖x − ±ref‖ / 2), exact near 0°."""
    x, ref = x[:, : len(ok)], ref[:, : len(ok)]
    sign = torch.where((x * ref).sum(0) < 0, -1.0, 1.0).to(x.dtype)
    half = (torch.linalg.vector_norm(x - sign * ref, dim=0) / 2).clamp(max=1.0)
    return [math.degrees(2 * math.asin(float(h))) if good else None for h, good in zip(half, ok, strict=True)]


def trajectory(
    paths: Sequence[str | Path], *, base: str | Path | None = None, delta: str | None = None,
    top_k: int = DEFAULT_TOP_K, subspace_rank: int | None = None, settle_degrees: float = DEFAULT_SETTLE_DEGREES,
    step_regex: str = DEFAULT_STEP_REGEX, include: Sequence[str] = (), exclude: Sequence[str] = (),
    command: str | None = None, hashed: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """One row per (matrix, checkpoint) of a training run (see the module docstring).

    Raises:
        OptionError: Fewer than two checkpoints, a bad option, ``base`` without ``delta="base"``.
        CheckpointError: A checkpoint is unreadable.
        ShapeMismatchError: A matrix changes shape between checkpoints, or is missing from one.
    """
    if delta not in (None, *DELTAS):
        raise OptionError(f"--delta must be one of {', '.join(DELTAS)} but got {delta!r}")
    if base is not None and delta != "base":
        raise OptionError("--base is W(0) for --delta base; give --delta base with it")
    if top_k < 1 or (subspace_rank is not None and subspace_rank < 1):
        raise OptionError("--top-k and --subspace-rank must be positive")
    order = checkpoint_order(paths, step_regex)
    files = [p for p, _ in order] + ([Path(base)] if base is not None else [])
    with open_checkpoint(files[0]) as first:
        specs = select_matrices(first, include=include, exclude=exclude).specs
        inputs: list[_Input] = [_Input(first.path, first.files)]
    for path in files[1:]:  # one checkpoint open at a time: a legacy .bin is held whole while open
        with open_checkpoint(path) as ckpt:
            for spec in specs:
                if spec.name not in ckpt or ckpt.info(spec.name).shape != spec.shape:
                    where = "missing" if spec.name not in ckpt else f"of shape {list(ckpt.info(spec.name).shape)}"
                    raise ShapeMismatchError(
                        f"{ckpt.path}: tensor {spec.name!r} is {where}, {list(spec.shape)} in {files[0]}"
                    )
            inputs.append(_Input(ckpt.path, ckpt.files))
    world = current()  # under torchrun: each process follows its share of the matrices
    share = world.share(specs, lambda s: s.count * s.rows * s.cols * min(s.rows, s.cols) * len(order))
    base_input = inputs[-1] if base is not None else None
    with hashing_inputs(inputs[0], base_input, hashed=hashed, world=world) as digests:

        def follow() -> tuple[list[dict[str, Any]], dict[str, Any]]:
            rows: list[dict[str, Any]] = []
            for spec in share:
                for j in range(spec.count):
                    rows += _matrix_rows(spec, j, files, order, delta, top_k, subspace_rank, settle_degrees)
            return rows, digests()

        parts = world.gather(follow)
    position = {spec.name: i for i, spec in enumerate(specs)}
    rows = sorted((r for part, _ in parts for r in part), key=lambda r: (position[r["name"]], r["expert"] or 0))
    recorded = merge_inputs([d for _, d in parts]) | {"checkpoints": [str(p) for p, _ in order]}
    meta = provenance(
        command=command or "lowrank_audit.trajectory(...)",
        inputs=recorded,
        options={
            "delta": delta,
            "top_k": top_k,
            "subspace_rank": subspace_rank,
            "settle_degrees": settle_degrees,
            "step_regex": step_regex,
            "identifiable_gap": IDENTIFIABLE_GAP,
        },  # fmt: skip
    )
    return build_frame(rows, meta, schema=TRAJECTORY_SCHEMA)


@dataclass(frozen=True)
class _Input:
    """A checkpoint as provenance records it, after it is closed."""

    path: Path
    files: tuple[Path, ...]


def _matrix_rows(
    spec: MatrixSpec, j: int, files: list[Path], order: list[tuple[Path, int | None]], delta: str | None,
    top_k: int, subspace_rank: int | None, settle_degrees: float,
) -> list[dict[str, Any]]:  # fmt: skip
    def read(path: Path) -> torch.Tensor:
        with open_checkpoint(path) as ckpt:
            return ckpt[spec.name].reshape(spec.count, spec.rows, spec.cols)[j].double().clone()

    w0 = read(files[-1] if len(files) > len(order) else files[0]) if delta == "base" else None
    first = 1 if delta == "consecutive" else 0

    def matrix(t: int) -> torch.Tensor:
        w = read(files[t])
        if delta == "base":
            return w - w0
        return w - read(files[t - 1]) if delta == "consecutive" else w

    last_u, last_s, last_v = _svd(matrix(len(order) - 1))
    values = last_s.numpy()
    r = subspace_rank or energy_rank(values, float(np.square(values).sum()), 0.95) or None
    r = min(r, len(last_s)) if r else None
    k = min(top_k, len(last_s))
    rows, ref = [], None
    for t in range(first, len(order)):
        u, s, v = (last_u, last_s, last_v) if t == len(order) - 1 else _svd(matrix(t))
        ok = _identifiable(s, k)
        if ref is None and float(s[0]) > 0:  # the first nonzero matrix (W(0) - W(0) is zero)
            ref = (u, v, ok)
        both = [a and b for a, b in zip(ok, ref[2], strict=True)] if ref is not None else [False] * k
        angle = None
        if r and _separated(s, r):  # a top-r subspace exists only where σ_r stands above σ_r+1
            left = largest_principal_angle(u[:, :r], last_u[:, :r])
            angle = max(left, largest_principal_angle(v[:, :r], last_v[:, :r]))
        kind = {"base": "delta", "consecutive": "step"}.get(delta or "", "weight")
        rows.append({
            "name": spec.name, "module": spec.module, "layer": spec.layer, "role": spec.role,
            "expert": j if len(spec.shape) == 3 else None, "checkpoint": str(order[t][0]), "index": t,
            "step": order[t][1], "kind": kind, "rows": spec.rows, "cols": spec.cols,
            "frobenius_norm": float(s.square().sum().sqrt()), "singular_values": s[:k].tolist(),
            "u_angles": _angles(u, ref[0] if ref else u, both), "v_angles": _angles(v, ref[1] if ref else v, both),
            "subspace_rank": r, "subspace_angle": angle,
        })  # fmt: skip
    # The last checkpoint is 0° from itself: settling there says nothing, so it needs one more.
    by_step = all(row["step"] is not None for row in rows)
    settled = None
    for row in reversed(rows[:-1]):
        if row["subspace_angle"] is None or row["subspace_angle"] > settle_degrees:
            break
        settled = row["step"] if by_step else row["index"]
    for row in rows:
        row["settling_step"] = settled
    return rows


def _separated(s: torch.Tensor, r: int) -> bool:
    below = float(s[r]) if r < len(s) else 0.0
    return float(s[0]) > 0 and float(s[r - 1]) - below > IDENTIFIABLE_GAP * float(s[0])


__all__ = ["DELTAS", "IDENTIFIABLE_GAP", "TRAJECTORY_COLUMNS", "TRAJECTORY_SCHEMA", "checkpoint_order", "trajectory"]
