"""One exception hierarchy; each error knows the exit code the CLI maps it to."""

from __future__ import annotations


class LowrankAuditError(Exception):
    """Root of every error this package raises on bad input or usage (exit code 2)."""

    exit_code = 2


class CheckpointError(LowrankAuditError, OSError):
    """A checkpoint cannot be found, opened or read; the message names the file and tensor."""


class OutputError(LowrankAuditError, OSError):
    """A file or folder cannot be written (a full disk, a read-only or forbidden folder); the
    message names the path and the cause. Nothing half-written is left behind."""


class ShapeMismatchError(LowrankAuditError, ValueError):
    """A fine-tuned tensor and its base tensor have different shapes."""


class NoMatricesSelected(LowrankAuditError, ValueError):
    """Selection left nothing to audit (patterns too narrow, or no matrix in the file)."""


class OptionError(LowrankAuditError, ValueError):
    """An option has a value outside its domain (device, dtype, budget, output path)."""


class UnpairedTensorsWarning(UserWarning):
    """With a base checkpoint, some tensor names exist on one side only; they are skipped."""


class PolicyError(LowrankAuditError, ValueError):
    """A check policy is malformed; the message names the file and the key."""


class RuleNotEvaluable(LowrankAuditError, ValueError):
    """A check rule cannot run (a missing ``--base`` or ``--baseline``, a column absent from a
    report, globs that match nothing) and its policy does not allow skipping it.

    ``blocked`` holds ``(rule, reason)`` for every such rule, in policy order.
    """

    def __init__(self, message: str, blocked: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.blocked = blocked


class VerificationError(LowrankAuditError, RuntimeError):
    """Files just written do not reproduce what they stand for (checked on re-reading them);
    the message names the file, the module or tensor and by how much. Nothing is written."""


def describe(err: BaseException) -> tuple[str, int] | None:
    """The one line and exit code for an error a user can act on (2), or None for a bug.

    Shared by the CLI's error path and by :mod:`lowrank_audit.distributed`, which sends a
    failure on one process to the others as this pair.
    """
    if isinstance(err, LowrankAuditError):
        return str(err), err.exit_code
    if isinstance(err, MemoryError):
        return f"out of memory{': ' + str(err) if str(err) else ''}", 2
    if isinstance(err, OSError):  # outside our readers and writers (a report, a policy file)
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err}", 2
    return None
