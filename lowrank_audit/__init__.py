"""lowrank-audit: spectral auditing of neural-network checkpoints.

The public API is imported lazily so that ``lowrank-audit --help`` and
``import lowrank_audit`` stay instant (no torch import until a function is used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lowrank_audit._version import __version__

_EXPORTS = {
    "spectrum": "lowrank_audit.analyses.spectrum",
    "activations": "lowrank_audit.analyses.activations",
    "capture": "lowrank_audit.analyses.capture",
    "open_checkpoint": "lowrank_audit.io.checkpoint",
    "read_report": "lowrank_audit.formats.report",
    "write_report": "lowrank_audit.formats.report",
    "check": "lowrank_audit.policy",
    "load_policy": "lowrank_audit.policy",
    "LowrankAuditError": "lowrank_audit.errors",
    "CheckpointError": "lowrank_audit.errors",
    "ShapeMismatchError": "lowrank_audit.errors",
    "NoMatricesSelected": "lowrank_audit.errors",
    "OptionError": "lowrank_audit.errors",
    "PolicyError": "lowrank_audit.errors",
    "RuleNotEvaluable": "lowrank_audit.errors",
    "VerificationError": "lowrank_audit.errors",
    "UnpairedTensorsWarning": "lowrank_audit.errors",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from lowrank_audit.analyses.activations import activations
    from lowrank_audit.analyses.capture import capture
    from lowrank_audit.analyses.spectrum import spectrum
    from lowrank_audit.errors import (
        CheckpointError,
        LowrankAuditError,
        NoMatricesSelected,
        OptionError,
        PolicyError,
        RuleNotEvaluable,
        ShapeMismatchError,
        UnpairedTensorsWarning,
        VerificationError,
    )
    from lowrank_audit.formats.report import read_report, write_report
    from lowrank_audit.io.checkpoint import open_checkpoint
    from lowrank_audit.policy import check, load_policy


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowrank_audit' has no attribute {name!r}")
