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
