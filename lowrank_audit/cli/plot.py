"""``lowrank-audit plot``: a picture of any report the tool writes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lowrank_audit.cli.app import command
from lowrank_audit.cli.options import ForceOpt, path_option
from lowrank_audit.cli.render import line


@command()
def plot(
    reports: Annotated[
        list[Path],
        typer.Argument(
            help="A report (spectrum, trajectory, compress or recommend), or several spectrum reports side by side (activations beside weights).",
            metavar="REPORT",
            show_default=False,
        ),
    ],
    out: Annotated[Path, path_option("--out", "The picture: .png, .svg or .pdf.", "-o")],
    layers: Annotated[
        str | None, typer.Option(help="Glob on tensor names: draw only these rows.", metavar="GLOB")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Draw a report: normalized spectra and a depth x role heatmap of k95, singular values and angles over training, or ranks and energy kept per layer.

    Needs matplotlib (pip install 'lowrank-audit[plot]'), imported by this command only.

    Example: lowrank-audit plot traj.parquet --out trajectory.png
    """
    from lowrank_audit.analyses.plot import plot as run_plot

    written = run_plot(reports, out, layers=layers, force=force)
    line(f"picture written to {escape(str(written))}")
