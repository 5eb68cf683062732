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


__all__ = ["FORMAT", "METADATA_KEY", "WEIGHTS_NAME", "dense", "factor_names", "layout", "write_factorized"]
