"""``lowrank-audit expand``: a factorized checkpoint back to a dense one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.markup import escape

from lowrank_audit.cli.app import command
from lowrank_audit.cli.options import ForceOpt, path_argument, path_option
from lowrank_audit.cli.render import line


@command()
def expand(
    source: Annotated[
        Path, path_argument("SOURCE", "A folder (or its model.safetensors) written by compress without --base.")
    ],
    out: Annotated[Path, path_option("--out", "Dense .safetensors file to write.", "-o")],
    force: ForceOpt = False,
) -> None:
    """Multiply a factorized checkpoint back into a dense one: original names, shapes and dtypes."""
    from lowrank_audit.formats.lowrank import expand as run_expand

    written = run_expand(source, out, force=force)
    line(f"dense checkpoint written to {escape(str(written))}")
