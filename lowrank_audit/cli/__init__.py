"""The ``lowrank-audit`` command line: parse, call one library function, render, map errors.

``app`` holds the Typer app and the error mapper, ``options`` every option declared once,
``render`` tables, JSON and progress; one module per command.
"""

from lowrank_audit.cli import (  # noqa: F401 - registers the commands
    activations,
    capture,
    check,
    compress,
    expand,
    plot,
    recommend,
    spectrum,
    trajectory,
)
from lowrank_audit.cli.app import app


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
