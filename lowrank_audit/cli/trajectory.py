"""``lowrank-audit trajectory``: singular values and vectors across training checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from lowrank_audit.cli.app import command, command_line
from lowrank_audit.cli.options import ExcludeOpt, ForceOpt, IncludeOpt, Reporting, path_option
from lowrank_audit.cli.render import frame_rows, line, missing, out_console, print_json, table
from lowrank_audit.wording import plural

if TYPE_CHECKING:
    from lowrank_audit.distributed import World

TABLE = (("module", "module", "{}"), ("first", "σ₁ first", "{:.3g}"), ("last", "σ₁ last", "{:.3g}"),
         ("growth", "growth", "{:.2f}×"), ("rank", "r", "{}"), ("start_angle", "first angle", "{:.1f}°"),
         ("settling_step", "settled at", "{}"))  # fmt: skip
JSON_COLUMNS = ("name", "expert", "checkpoint", "index", "step", "kind", "rows", "cols", "frobenius_norm",
                "singular_values", "u_angles", "v_angles", "subspace_rank", "subspace_angle", "settling_step")  # fmt: skip


@command()
def trajectory(
    checkpoints: Annotated[
        list[str],
        typer.Argument(
            help="Checkpoints in training order (or a quoted glob such as 'ckpt/step-*.safetensors', sorted by the step in the names).",
            metavar="CKPT",
            show_default=False,
        ),
    ],
    out: Annotated[Path, path_option("--out", "Write one row per (matrix, checkpoint) to this Parquet file.", "-o")],
    init: Annotated[
        Path | None, path_option("--base", "W(0) for --delta base (default: the first checkpoint).", "-b")
    ] = None,
    delta: Annotated[
        str | None,
        typer.Option(
            help="base: follow W(t) - W(0); consecutive: follow each step's update W(t) - W(t-1). Default: W(t).",
            metavar="base|consecutive",
        ),
    ] = None,
    top_k: Annotated[
        int, typer.Option(help="Singular values and vectors followed per matrix.", min=1, metavar="K")
    ] = 8,
    subspace_rank: Annotated[
        int | None,
        typer.Option(help="r of the subspace angle (default: the last checkpoint's k95).", min=1, metavar="R"),
    ] = None,
    settle_degrees: Annotated[
        float, typer.Option(help="A subspace has settled once its angle to the last stays within this.", metavar="DEG")
    ] = 5.0,
    step_regex: Annotated[
        str,
        typer.Option(help="Regular expression whose first group (or match) in a file name is its step.", metavar="RE"),
    ] = r"(\d+)(?!.*\d)",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    force: ForceOpt = False,
    *,
    reporting: Reporting,
    world: World,
) -> None:
    """How singular values and singular vectors move across training checkpoints.

    For every matrix and checkpoint: the top singular values, the angle of each singular vector to its start (where its value is separated from its neighbours; null otherwise), the largest principal angle of the top-r subspace to the last checkpoint's, and the step from which that subspace has settled. Matrices are read one at a time and decomposed exactly in float64.

    Example: lowrank-audit trajectory 'sample_checkpoints/dmf/step-*.safetensors' --out traj.parquet
    """
    from lowrank_audit.analyses.trajectory import TRAJECTORY_SCHEMA
    from lowrank_audit.analyses.trajectory import trajectory as run_trajectory
    from lowrank_audit.formats.report import write_report
    from lowrank_audit.io.outputs import check_target

    check_target(out, [Path(c) for c in checkpoints] + ([init] if init else []), force=force)
    frame = run_trajectory(
        checkpoints, base=init, delta=delta, top_k=top_k, subspace_rank=subspace_rank, settle_degrees=settle_degrees,
        step_regex=step_regex, include=include or (), exclude=exclude or (), command=command_line(),
    )  # fmt: skip
    world.on_main(lambda: write_report(frame, out, schema=TRAJECTORY_SCHEMA, force=force))
    if reporting.as_json:
        print_json({"trajectory": str(out), "rows": frame_rows(frame, JSON_COLUMNS)})
        return
    summary = []
    for (name, expert), rows in frame.groupby(["name", "expert"], dropna=False, sort=True):
        first, last = rows.iloc[0], rows.iloc[-1]
        s0, s1 = first["singular_values"][0], last["singular_values"][0]
        summary.append({
            "module": name + ("" if missing(expert) else f"[{int(expert)}]"),
            "first": s0, "last": s1, "growth": s1 / s0 if s0 > 0 else float("nan"),
            "rank": first["subspace_rank"], "start_angle": rows["subspace_angle"].dropna().iloc[0]
            if rows["subspace_angle"].notna().any() else None, "settling_step": first["settling_step"],
        })  # fmt: skip
    if reporting.tables:
        title = f"Trajectory over {frame['index'].nunique()} checkpoints ({plural(len(summary), 'matrix', 'matrices')})"
        out_console.print(table(summary[: reporting.top], TABLE, title))
    line(f"{len(frame)} rows written to {escape(str(out))}")
