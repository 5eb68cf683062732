"""Provenance recorded in every report: tool version, command, inputs with size and SHA-256,
device and torch version. Built here once, so every command records the same fields."""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lowrank_audit._version import __version__
from lowrank_audit.errors import CheckpointError

if TYPE_CHECKING:
    from lowrank_audit.distributed import World


class Input(Protocol):
    """What provenance records of an input (a :class:`~lowrank_audit.io.checkpoint.Checkpoint`
    or an :class:`~lowrank_audit.io.adapters.Adapter`): the path given and every file read."""

    path: Path

    @property
    def files(self) -> tuple[Path, ...]: ...


class _Stopped(Exception):
    """Hashing abandoned: its result is no longer wanted."""


def file_digest(path: Path, *, stop: threading.Event | None = None, hashed: bool = True) -> dict[str, Any]:
    """Path, size and SHA-256 of one input file (None unless ``hashed``); ``stop``, once set,
    abandons it at the next MiB."""
    if not hashed:
        return {"path": str(path), "size": path.stat().st_size, "sha256": None}
    sha = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                if stop is not None and stop.is_set():
                    raise _Stopped
                sha.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read for hashing: {exc.strerror or exc}") from exc
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha.hexdigest()}


def checkpoint_inputs(
    ckpt: Input, base: Input | None = None, *, stop: threading.Event | None = None, hashed: bool = True,
    world: World | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``{"checkpoint": {...}, "base": {...}}``: each with its path and every file's digest.

    With a ``world`` of several processes each hashes its size-balanced share of the files
    (the others' ``sha256`` is None here): :func:`merge_inputs` joins the processes' dicts.
    """
    files = [f for c in (ckpt, base) if c is not None for f in c.files]
    mine = set(world.share(files, lambda f: f.stat().st_size)) if world is not None else set(files)

    def one(c: Input) -> dict[str, Any]:
        return {"path": str(c.path),
                "files": [file_digest(f, stop=stop, hashed=hashed and f in mine) for f in c.files]}  # fmt: skip

    return {"checkpoint": one(ckpt)} | ({"base": one(base)} if base is not None else {})


def merge_inputs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One :func:`checkpoint_inputs` dict from each process's, every file's digest from the
    process that computed it."""
    merged = copy.deepcopy(parts[0])
    for part in parts[1:]:
        for key, entry in part.items():
            for mine, theirs in zip(merged[key]["files"], entry["files"], strict=True):
                mine["sha256"] = mine["sha256"] or theirs["sha256"]
    return merged


@contextmanager
def hashing_inputs(
    ckpt: Input, base: Input | None = None, *, hashed: bool = True, world: World | None = None
) -> Iterator[Callable[[], dict[str, Any]]]:
    """:func:`checkpoint_inputs` on a background thread; yields the function that waits for it.

    hashlib and file reads release the GIL, so the SHA-256 of the inputs (0.1-0.2 s per
    100 MB) runs while the engine decomposes instead of after it. Leaving the block without
    waiting (an error, Ctrl-C) abandons the hashing within a MiB of reading. Without
    ``hashed`` (nothing will show the digests) no thread starts and ``sha256`` is None.
    With a ``world``, this process hashes only its share of the files (:func:`checkpoint_inputs`).
    """
    if not hashed:
        yield lambda: checkpoint_inputs(ckpt, base, hashed=False)
        return
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowrank-audit-hash")
    future = pool.submit(checkpoint_inputs, ckpt, base, stop=stop, world=world)
    try:
        yield future.result
    finally:
        stop.set()
        pool.shutdown(wait=True)


def provenance(*, command: str, inputs: dict[str, Any], device: str | None = None, **extra: Any) -> dict[str, Any]:
    """The metadata dict a report carries in ``attrs["lowrank_audit"]`` and in its Parquet file,
    with the processes that produced it (``world_size``, ``backend``: 1 and None alone)."""
    import torch

    from lowrank_audit.distributed import current

    meta = {
        "tool_version": __version__,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "device": device,
        "torch_version": torch.__version__,
    }
    return meta | current().describe() | extra


__all__ = ["checkpoint_inputs", "file_digest", "hashing_inputs", "merge_inputs", "provenance"]
