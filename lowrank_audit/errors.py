"""One exception hierarchy; each error knows the exit code the CLI maps it to."""

from __future__ import annotations


class LowrankAuditError(Exception):
    """Root of every error this package raises on bad input or usage (exit code 2)."""

    exit_code = 2


class CheckpointError(LowrankAuditError, OSError):
    """A checkpoint cannot be found, opened or read; the message names the file and tensor."""


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
