"""The factorized checkpoint: a safetensors file where chosen matrices are stored as two factors.

A matrix ``NAME`` [m, n] of rank r becomes ``NAME.lowrank_B`` [m, r] and ``NAME.lowrank_A``
[r, n] with ``NAME ≈ lowrank_B @ lowrank_A`` (the LoRA convention), in the matrix's
dtype. Every other tensor is stored unchanged. The header metadata key ``lowrank_audit``
holds JSON ``{"format": "lowrank-audit.factorized/1", "factorized": {NAME: {"shape": [m, n],
"dtype": "float16", "rank": r}}}``, which is all :func:`expand` needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_audit.errors import CheckpointError
from lowrank_audit.io.outputs import atomic_file, check_target

FORMAT = "lowrank-audit.factorized/1"
METADATA_KEY = "lowrank_audit"
WEIGHTS_NAME = "model.safetensors"


def factor_names(name: str) -> tuple[str, str]:
    """Names of ``(A, B)`` for matrix ``name``."""
    return f"{name}.lowrank_A", f"{name}.lowrank_B"


def write_factorized(tensors: dict[str, torch.Tensor], factorized: dict[str, dict[str, Any]], path: Path) -> None:
    meta = {"format": FORMAT, "factorized": factorized}
    save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata={METADATA_KEY: json.dumps(meta)})


def layout(path: Path) -> dict[str, dict[str, Any]]:
    """The ``factorized`` table of a factorized checkpoint.

    Raises:
        CheckpointError: The file is unreadable or is not a factorized checkpoint.
    """
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: cannot read safetensors header: {exc}") from exc
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a lowrank-audit factorized checkpoint (no {FORMAT} metadata)")
    return meta["factorized"]


def dense(a: torch.Tensor, b: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """The matrix ``b @ a`` in its original shape and dtype (multiplied in float32 at least)."""
    work = torch.promote_types(a.dtype, torch.float32)
    return (b.to(work) @ a.to(work)).reshape(entry["shape"]).to(getattr(torch, entry["dtype"]))


def expand(path: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Multiply a factorized checkpoint back into a dense safetensors file.

    Args:
        path: A folder written by :func:`compress` without base, or its ``model.safetensors``.
        out: The dense ``.safetensors`` file: original names, shapes and dtypes; every
            tensor that was not factorized is copied unchanged.
        force: Replace an existing ``out``.

    Raises:
        CheckpointError: ``path`` is not a factorized checkpoint.
        OptionError: ``out`` exists without ``force``, or is the input.
    """
    path, out = Path(path), Path(out)
    source = path / WEIGHTS_NAME if path.is_dir() else path
    if not source.exists():
        raise CheckpointError(f"{source}: no such file")
    check_target(out, [path, source], force=force)
    entries = layout(source)
    factor_of = {n: name for name in entries for n in factor_names(name)}
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(source), "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if name in factor_of:
                matrix = factor_of[name]
                if matrix not in tensors:
                    a_name, b_name = factor_names(matrix)
                    tensors[matrix] = dense(f.get_tensor(a_name), f.get_tensor(b_name), entries[matrix])
            else:
                tensors[name] = f.get_tensor(name)
    with atomic_file(out, force=force) as tmp:
        save_file(dict(sorted(tensors.items())), tmp, metadata={"format": "pt"})
    return out


__all__ = ["FORMAT", "METADATA_KEY", "WEIGHTS_NAME", "dense", "expand", "factor_names", "layout", "write_factorized"]
