"""The one way the tool writes a file or folder: refused if it exists (unless ``force``),
never over an input, atomic, with the usual permissions.

Every output goes to a temporary name in its destination folder, is flushed to disk
(fsync) and renamed onto its final name only when complete, so a reader never sees half
a file and a failure leaves the old file (or nothing) in place. Temporaries get the mode
a plain ``open`` would give (0644 files and 0755 folders under umask 022), not the 0600
of :mod:`tempfile`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lowrank_audit.errors import OptionError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_overwriting_inputs(out: Path, inputs: Iterable[Path], *, option: str = "--out") -> None:
    """Refuse an output that is an input, lies inside an input folder, or contains an input.

    Raises:
        OptionError: Writing ``out`` could touch an input.
    """
    target = out.resolve()
    for path in inputs:
        src = Path(path).resolve()
        if target == src or (src.is_dir() and target.is_relative_to(src)) or src.is_relative_to(target):
            raise OptionError(f"output {out} would overwrite input {path}; choose another {option}")


def check_target(
    out: str | Path, inputs: Iterable[str | Path] = (), *, force: bool = False, option: str = "--out",
    folder: bool = False,
) -> Path:  # fmt: skip
    """Refuse ``out`` before any work is done: an input, an existing target without ``force``,
    or a file where a folder is wanted (and the other way round).

    Raises:
        OptionError: The message names the path and the option (and ``--force``).
    """
    out = Path(out)
    refuse_overwriting_inputs(out, [Path(p) for p in inputs], option=option)
    if out.exists() and out.is_dir() != folder:
        want = "a folder" if folder else "a file name such as " + str(out / "report.parquet")
        raise OptionError(f"{option} {out} is {'a folder' if out.is_dir() else 'a file'}; give {want}")
    if out.exists() and not force:
        raise OptionError(f"{option} {out} exists; use --force to replace it")
    return out


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without error, removed otherwise.

    Raises:
        OptionError: ``path`` exists (checked again when renaming) and ``force`` is False.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OptionError(f"{path} exists; use --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        if path.exists() and not force:
            raise OptionError(f"{path} appeared while it was being written; use --force to replace it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside ``path`` to fill; it takes the name ``path`` when the
    block ends without error (an old ``path``, with ``force``, is removed only then).

    Raises:
        OptionError: ``path`` exists and ``force`` is False, or it is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"output {path} is a file; --out takes a folder")
    if path.exists() and not force:
        raise OptionError(f"output folder {path} exists; use --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o777 & ~_umask())
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_file():
                os.chmod(item, 0o666 & ~_umask())
                _fsync(item)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str, *, force: bool = False) -> Path:
    """Write a UTF-8 text file atomically (see :func:`atomic_file`)."""
    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


__all__ = ["atomic_file", "atomic_folder", "check_target", "refuse_overwriting_inputs", "write_text"]
