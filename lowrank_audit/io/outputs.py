"""The one way the tool writes a file or folder: refused if it exists (unless ``force``),
never over an input, atomic, with the usual permissions.

Every output goes to a temporary name in its destination folder, is flushed to disk
(fsync) and renamed onto its final name only when complete, so a reader never sees half
a file and a failure leaves the old file (or nothing) in place. Temporaries get the mode
a plain ``open`` would give (0644 files and 0755 folders under umask 022), not the 0600
of :mod:`tempfile`.

Temporaries are named ``.NAME.lowrank-audit.HOST.PID.tmp`` (``.old`` for a folder being
replaced). A run killed inside the write window (SIGKILL, power loss) cannot remove its
own; the next write into the same folder removes those whose process is gone (same host,
PID no longer running). A write that fails (a full disk, a read-only or forbidden folder)
raises :class:`~lowrank_audit.errors.OutputError` naming the path and the cause.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from lowrank_audit.errors import LowrankAuditError, OptionError, OutputError

# Dots would make the name ambiguous; hosts differ in their first label on a cluster.
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
_TEMPORARY = re.compile(r"^\..+\.lowrank-audit\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?:tmp|old)$")


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


def _temporary(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.lowrank-audit.{_HOST}.{os.getpid()}.{kind}")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # alive and someone else's, or no PID of ours
        return True
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporaries that killed runs on this host left in ``folder``; returns them.

    A run killed while replacing a folder, between moving the old one aside (``.old``) and
    moving the new one in, leaves the output missing: the old one is put back, not removed.
    """
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] != _HOST or _running(int(match["pid"])):
            continue
        output = folder / entry.name[1 : match.start("host") - len(".lowrank-audit.")]
        if entry.name.endswith(".old") and not output.exists() and not output.is_symlink():
            os.replace(entry, output)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _cause(exc: BaseException) -> str:
    """The OS's words for a write failure: "No space left on device", "Read-only file system".

    safetensors and pyarrow report them inside their own text ("... (os error 28)",
    "Failed to open local file '<temporary>'. Detail: [errno 30] ..."), which would name the
    temporary; the error number gives the words alone.
    """
    code = re.search(r"(?:os error|errno) (\d+)", str(exc), re.IGNORECASE)
    if code:
        return os.strerror(int(code[1]))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failure to write ``path`` (the OS's, or a library's wrapping it) into an OutputError."""
    from safetensors import SafetensorError

    try:
        yield
    except LowrankAuditError:
        raise
    except (OSError, SafetensorError) as exc:
        raise OutputError(f"cannot write {path}: {_cause(exc)}") from exc


def _prepare(path: Path) -> None:
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)


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
    _prepare(path)
    tmp = _temporary(path)
    try:
        with _writing(path):
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
            if path.exists() and not force:
                raise OptionError(f"{path} appeared while it was being written; use --force to replace it")
            os.replace(tmp, path)
    finally:
        with suppress(OSError):  # a read-only folder refuses even removing what is not there
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
    _prepare(path)
    tmp, old = _temporary(path), _temporary(path, "old")
    try:
        with _writing(path):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=0o777 & ~_umask())
            yield tmp
            for item in tmp.rglob("*"):
                if item.is_file():
                    os.chmod(item, 0o666 & ~_umask())
                    _fsync(item)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
    finally:
        with suppress(OSError):
            if old.exists() and not path.exists():
                os.replace(old, path)  # the new folder never took the name: the old one keeps it
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str, *, force: bool = False) -> Path:
    """Write a UTF-8 text file atomically (see :func:`atomic_file`)."""
    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


__all__ = ["atomic_file", "atomic_folder", "check_target", "refuse_overwriting_inputs", "remove_stale", "write_text"]
