"""``lowrank-audit spectrum``: the singular-value spectrum of every matrix or update."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from rich.markup import escape

from lowrank_audit.cli.app import command, command_line
from lowrank_audit.cli.options import (
    AlignmentOpt,
    CheckpointArg,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    RankCapOpt,
    Reporting,
    base_option,
    path_option,
)
from lowrank_audit.cli.render import json_value, line, missing, out_console, print_json, progress_bar, table
from lowrank_audit.wording import plural

if TYPE_CHECKING:
    from lowrank_audit.analyses.spectrum import ReportRows
    from lowrank_audit.distributed import World
    from lowrank_audit.engine.batches import ProgressCallback

# The summary table after the module name: (report column, heading, format).
TABLE = (
    ("label", "module", "{}"),
    ("matrix", "shape", "{}"),
    ("spectral_norm", "σ₁", "{:.3g}"),
    ("effective_rank", "erank", "{:.1f}"),
    ("k90", "k90", "{}"),
    ("k95", "k95", "{}"),
    ("k99", "k99", "{}"),
    ("signal_rank", "signal", "{}"),
    ("k95_ratio", "k95%", "{:.0%}"),
)
# An adapter's table: the rank it declares beside the ranks its update uses, and its balance.
ADAPTER_TABLE = (
    ("label", "module", "{}"),
    ("matrix", "shape", "{}"),
    ("adapter_rank", "r", "{}"),
    ("numerical_rank", "used", "{}"),
    ("k90", "k90", "{}"),
    ("k95", "k95", "{}"),
    ("k99", "k99", "{}"),
    ("spectral_norm", "σ₁", "{:.3g}"),
    ("factor_norm_ratio", "‖B‖/‖A‖", "{:.3g}"),
    ("factor_imbalance", "imbalance", "{:.3g}"),
)
JSON_COLUMNS = (
    "name", "expert", "kind", "role", "layer", "rows", "cols", "dtype", "frobenius_norm", "spectral_norm",
    "nuclear_norm", "stable_rank", "effective_rank", "numerical_rank", "k90", "k95", "k99", "k90_lo", "k90_hi",
    "k95_lo", "k95_hi", "k99_lo", "k99_hi", "k95_ratio", "signal_rank", "noise_sigma", "noise_share",
    "precision_floor", "condition_number", "adapter_rank", "adapter_scale", "adapter_usage", "factor_norm_ratio",
    "factor_imbalance", "base_angle", "intruder_dimensions",
    "nonfinite", "method", "k",
)  # fmt: skip


# The report's rows are rendered as the analysis returns them (a row of a matrix not
# decomposed lacks the metric keys: ``.get``), so no frame is built unless --out asks for one.


def _lowness(row: dict) -> float:
    """How low-rank a row is: k95 over the rank it could have, min(rows, cols) or an adapter's declared r."""
    if not missing(row.get("adapter_rank")) and not missing(row.get("k95")):
        return row["k95"] / row["adapter_rank"]
    return row["k95_ratio"]


def summary_rows(rows: list[dict], top: int) -> list[dict]:
    ranked = sorted((r for r in rows if not missing(r.get("k95_ratio"))), key=lambda r: (_lowness(r), r["name"]))
    shown = []
    for row in ranked[:top]:
        label = row["module"] + ("" if missing(row["expert"]) else f"[{row['expert']}]")
        row = row | {"label": label, "matrix": f"{row['rows']}×{row['cols']}"}
        for k in ("k90", "k95", "k99"):  # an uncertified rank shows the interval that holds it
            if missing(row.get(k)) and not missing(row.get(f"{k}_lo")):
                row[k] = f"{row[f'{k}_lo']}–{row[f'{k}_hi']}"
        shown.append(row)
    return shown


def json_summary(rows: list[dict], meta: dict, out: Path | None) -> dict:
    return {
        "tool_version": meta["tool_version"],
        "inputs": meta["inputs"],
        "device": meta["device"],
        "report": str(out) if out else None,
        "matrices": len(rows),
        "nonfinite_matrices": sum(1 for r in rows if r["nonfinite"] > 0),
        "skipped": meta["skipped"],
        "unpaired": meta["unpaired"],
        "rows": [{c: json_value(r.get(c)) for c in JSON_COLUMNS} for r in rows],
    }


def render(rows: list[dict], meta: dict, reporting: Reporting, elapsed: float, out: Path | None) -> None:
    if reporting.tables:
        shown = summary_rows(rows, reporting.top)
        kinds = {"delta": "updates (checkpoint - base)", "activation": "activations", "adapter": "adapter updates"}
        distinct = {r["kind"] for r in rows}
        what = kinds.get(next(iter(distinct)), "matrices") if len(distinct) == 1 else "matrices"
        columns, by = (ADAPTER_TABLE, "k95 / r") if distinct == {"adapter"} else (TABLE, "k95%")
        out_console.print(table(shown, columns, f"Most low-rank {what} ({len(shown)} of {len(rows)}, by {by})"))
    for row in rows:
        if row["nonfinite"] > 0:
            what = "rows" if row["kind"] == "activation" else "entries"
            line(f"[red]non-finite:[/] {escape(row['name'])} has {row['nonfinite']} NaN/Inf {what}; not decomposed")
    ranks = ("k90", "k95", "k99")
    open_ranks = sum(1 for r in rows if r["method"] == "randomized" and any(missing(r.get(k)) for k in ranks))
    if open_ranks:
        line(f"{plural(open_ranks, 'matrix', 'matrices')}: energy ranks not certified within 1 % (in the noise "
             "floor, or past --rank-cap) are left empty; k90_lo..k99_hi bound them")  # fmt: skip
    tensors = len({r["name"] for r in rows})
    text = f"Audited {plural(len(rows), 'matrix', 'matrices')} from {plural(tensors, 'tensor')}"
    text += f" on {meta['device']} in {elapsed:.2f} s"
    text += f"; {len(meta['skipped'])} tensors skipped (not matrices)" if meta["skipped"] else ""
    line(text + (f"; report written to {escape(str(out))}" if out else ""))


@command()
def spectrum(
    checkpoint: CheckpointArg,
    base: Annotated[
        Path | None, base_option("Base checkpoint: audit the update CHECKPOINT - BASE instead of the weights.")
    ] = None,
    out: Annotated[
        Path | None,
        path_option(
            "--out", "Write the full report (one row per matrix, singular values included) to this Parquet file.", "-o"
        ),
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    rank_cap: RankCapOpt = None,
    alignment: AlignmentOpt = False,
    force: ForceOpt = False,
    *,
    engine: dict,
    reporting: Reporting,
    world: World,
) -> None:
    """Singular-value spectrum of every weight matrix, or of every fine-tuning update with --base.

    Audits every floating tensor with two or more dimensions: 3-D tensors as stacked experts, convolution kernels flattened to out x (in*kh*kw). Reports norms, stable and effective rank, energy ranks k90/k95/k99, the Gavish-Donoho signal rank and more; --out writes them all, with the singular values, to Parquet.

    Example: lowrank-audit spectrum finetuned.safetensors --base base.safetensors --out r.parquet
    """
    from lowrank_audit.analyses.spectrum import spectrum_rows

    def audit(progress: ProgressCallback | None) -> ReportRows:
        # The table shows no digest: inputs are hashed only for --out and --json.
        return spectrum_rows(
            checkpoint, base, include=include or (), exclude=exclude or (), rank_cap=rank_cap,
            command=command_line(), progress=progress, hashed=out is not None or reporting.as_json,
            alignment=alignment, **engine,
        )  # fmt: skip

    report_command(audit, [checkpoint] + ([base] if base else []), out, force=force, reporting=reporting, world=world)


def report_command(
    audit: Callable[[ProgressCallback | None], ReportRows], inputs: Sequence[Path], out: Path | None, *,
    force: bool, reporting: Reporting, world: World,
) -> None:  # fmt: skip
    """What a command that makes a spectrum report does around it: refuse ``out`` early, audit
    under a progress bar, write the report, show the table or JSON (spectrum, activations).

    Only ``--out`` builds the report frame, so the table and JSON need neither pandas nor pyarrow.
    """
    from lowrank_audit.io.outputs import check_target

    if out is not None:
        check_target(out, inputs, force=force)
    started = time.perf_counter()
    with progress_bar(reporting.progress) as progress:
        rows, meta = audit(progress)
    elapsed = time.perf_counter() - started
    if out is not None:
        from lowrank_audit.formats.report import build_frame, write_report

        world.on_main(lambda: write_report(build_frame(rows, meta), out, force=force))  # rank 0 alone writes
    if reporting.as_json:
        print_json(json_summary(rows, meta, out))
    else:
        render(rows, meta, reporting, elapsed, out)
