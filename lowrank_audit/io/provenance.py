"""Provenance recorded in every report: tool version, command, inputs with size and SHA-256,
device and torch version. Built here once, so every command records the same fields."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lowrank_audit._version import __version__
from lowrank_audit.errors import CheckpointError
from lowrank_audit.io.checkpoint import Checkpoint


def file_digest(path: Path) -> dict[str, Any]:
    """Path, size and SHA-256 of one input file."""
    sha = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read for hashing: {exc.strerror or exc}") from exc
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha.hexdigest()}


def checkpoint_inputs(ckpt: Checkpoint, base: Checkpoint | None = None) -> dict[str, Any]:
    """``{"checkpoint": {...}, "base": {...}}``: each with its path and every file's digest."""

    def one(c: Checkpoint) -> dict[str, Any]:
        return {"path": str(c.path), "files": [file_digest(f) for f in c.files]}

    return {"checkpoint": one(ckpt)} | ({"base": one(base)} if base is not None else {})


def provenance(*, command: str, inputs: dict[str, Any], device: str | None = None, **extra: Any) -> dict[str, Any]:
    """The metadata dict a report carries in ``attrs["lowrank_audit"]`` and in its Parquet file."""
    import torch

    meta = {
        "tool_version": __version__,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "device": device,
        "torch_version": torch.__version__,
    }
    return meta | extra


__all__ = ["checkpoint_inputs", "file_digest", "provenance"]
