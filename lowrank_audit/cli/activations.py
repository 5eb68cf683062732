"""``lowrank-audit activations``: the spectrum report of what each module sees."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lowrank_audit.cli.app import command, command_line
from lowrank_audit.cli.options import ExcludeOpt, ForceOpt, IncludeOpt, Reporting, path_option
from lowrank_audit.cli.spectrum import report_command

if TYPE_CHECKING:
    from lowrank_audit.analyses.spectrum import ReportRows
    from lowrank_audit.distributed import World
    from lowrank_audit.engine.batches import ProgressCallback


@command()
def activations(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Activation files: dumps ([N, d] or [B, T, d] tensors named by module path; shards concatenate) or moments files written by capture.",
            metavar="ACTS",
            show_default=False,
        ),
    ],
    center: Annotated[
        bool,
        typer.Option(
            "--center", help="Spectrum of the centered rows (the covariance's) instead of the raw rows'.", metavar=""
        ),
    ] = False,
    out: Annotated[
        Path | None,
        path_option(
            "--out", "Write the report (one row per module, singular values included) to this Parquet file.", "-o"
        ),
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    force: ForceOpt = False,
    *,
    engine: dict,
    reporting: Reporting,
    world: World,
) -> None:
    """Singular-value spectrum of the inputs each module sees: how low-rank are the activations?

    The singular values of a module's input rows X come from the eigenvalues of XᵀX in float64 (exact, streamed: memory does not grow with the rows). The report has the columns of spectrum's, with kind = activation, rows = N and cols = d; check reads it like any other.

    Example: lowrank-audit activations sample_checkpoints/dropout/activations-dropout.safetensors --out acts.parquet
    """
    from lowrank_audit.analyses.activations import activation_rows

    def audit(progress: ProgressCallback | None) -> ReportRows:
        return activation_rows(
            files, center=center, include=include or (), exclude=exclude or (), command=command_line(),
            progress=progress, **engine,
        )  # fmt: skip

    report_command(audit, files, out, force=force, reporting=reporting, world=world)
