"""What ``capture`` reads: the model a user names (``MODULE:CALLABLE``) and the batch file.

The model is imported only because the user names it, never because a file says so: the
current directory is put first on ``sys.path`` for the import and the factory call (as
``python -m`` does) and taken off again; ``PYTHONPATH`` is searched as usual.

A batch file is a safetensors file of named tensors of any dtype (integer ``input_ids`` and
``attention_mask`` pass as they are) with one first dimension, the rows; it is read
``batch_size`` rows at a time through memory-mapped slices.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_audit.errors import CheckpointError, OptionError

DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class BatchFile:
    """Rows of a safetensors file of named tensors with equal first dimension, read
    ``batch_size`` rows at a time through memory-mapped slices (see :func:`open_batches`)."""

    path: Path
    names: tuple[str, ...]
    rows: int
    batch_size: int
    batches: range | None = None  # the batch indices read (a process's block under torchrun); None: all

    def _indices(self) -> range:
        return self.batches if self.batches is not None else range(math.ceil(self.rows / self.batch_size))

    def __len__(self) -> int:
        return len(self._indices())

    def part(self, batches: range) -> BatchFile:
        """The same file read for the batches ``batches`` only."""
        return replace(self, batches=batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            sliced = {name: f.get_slice(name) for name in self.names}
            for index in self._indices():
                start = index * self.batch_size
                yield {name: s[start : start + self.batch_size] for name, s in sliced.items()}


def open_batches(path: str | Path, *, batch_size: int = DEFAULT_BATCH_SIZE) -> BatchFile:
    """Check a batch file and return its batches: tensors of any dtype (integer ids pass as
    they are), all with the same first dimension, cut into ``batch_size`` rows.

    Raises:
        CheckpointError: The file is missing or unreadable, holds no tensor or a 0-D one, or
            tensors differ in first dimension; the message names the file and the tensor.
        OptionError: ``batch_size`` is below 1.
    """
    from safetensors import safe_open

    if batch_size < 1:
        raise OptionError(f"batch-size must be a positive integer but got {batch_size}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such batch file")
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {name: f.get_slice(name).get_shape() for name in sorted(f.keys())}
    except Exception as exc:  # safetensors raises its own types for bad headers
        raise CheckpointError(f"{path}: cannot read batches: {exc}") from exc
    if not shapes:
        raise CheckpointError(f"{path}: holds no tensor; write the model's inputs, e.g. input_ids [N, T]")
    first = next(iter(shapes))
    for name, shape in shapes.items():
        if not shape:
            raise CheckpointError(f"{path}: tensor {name!r} is 0-D; every tensor needs a first dimension of rows")
        if shape[0] != shapes[first][0]:
            raise CheckpointError(f"{path}: tensor {name!r} has {shape[0]} rows (first dimension) but "
                                  f"{first!r} has {shapes[first][0]}; every tensor must have the same first "
                                  "dimension")  # fmt: skip
    return BatchFile(path, tuple(shapes), shapes[first][0], batch_size)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type, then its message with newlines folded."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def load_model(spec: str) -> nn.Module:
    """Import ``MODULE:CALLABLE`` and call it with no arguments; it must return an ``nn.Module``.

    The current directory is first on ``sys.path`` during the import and the call.

    Raises:
        OptionError: The spec is malformed, the module cannot be imported, the attribute is
            missing or not callable, the call raises or returns something else; the message
            names the ``--model`` value.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise OptionError(f"--model {spec} must be MODULE:CALLABLE, e.g. mypkg.models:build")
    cwd = os.getcwd()
    added = not sys.path or sys.path[0] != cwd
    if added:
        sys.path.insert(0, cwd)
    try:
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as exc:  # the user's module may raise anything while importing
            raise OptionError(f"--model {spec}: cannot import {module_name!r} from the current directory or "
                              f"PYTHONPATH ({one_line(exc)})") from exc  # fmt: skip
        for part in attr.split("."):
            if not hasattr(target, part):
                raise OptionError(f"--model {spec}: {module_name!r} has no attribute {attr!r}")
            target = getattr(target, part)
        if not callable(target):
            raise OptionError(f"--model {spec}: {attr!r} is a {type(target).__name__}, not a callable")
        try:
            model = target()
        except Exception as exc:
            raise OptionError(f"--model {spec}: calling {attr}() raised {one_line(exc)}") from exc
    finally:
        if added:
            sys.path.remove(cwd)
    if not isinstance(model, nn.Module):
        raise OptionError(f"--model {spec}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


__all__ = ["DEFAULT_BATCH_SIZE", "BatchFile", "load_model", "one_line", "open_batches"]
