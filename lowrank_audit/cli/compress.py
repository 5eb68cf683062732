"""``lowrank-audit compress``: a PEFT LoRA adapter of a fine-tune, or a factorized checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from lowrank_audit.cli.app import command, command_line
from lowrank_audit.cli.options import (
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    Reporting,
    path_argument,
    path_option,
)
from lowrank_audit.cli.render import frame_rows, line, out_console, print_json, progress_bar, table

if TYPE_CHECKING:
    from lowrank_audit.distributed import World
    from lowrank_audit.ranks import RankPolicy

TABLE = (("name", "layer", "{}"), ("treatment", "treatment", "{}"), ("rank", "rank", "{}"),
         ("params_after", "params", "{:,}"), ("energy_kept", "kept", "{:.1%}"),
         ("relative_error", "error", "{:.3f}"))  # fmt: skip
JSON_COLUMNS = ("name", "module", "treatment", "rows", "cols", "rank", "params_before", "params_after", "energy_kept",
                "relative_error", "update_share", "calibrated", "damping", "output_error")  # fmt: skip


@command()
def compress(
    checkpoint: Annotated[Path, path_argument("CHECKPOINT", "Checkpoint to compress (the fine-tune, with --base).")],
    out: Annotated[Path, path_option("--out", "Output folder (refused if it exists, unless --force).", "-o")],
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            "-b",
            help="Base checkpoint: write the update CHECKPOINT - BASE as a PEFT LoRA adapter. Without it, write a factorized checkpoint.",
            metavar="PATH",
        ),
    ] = None,
    embeddings: Annotated[
        str,
        typer.Option(
            help="Adapters: embeddings and lm_head as full modules_to_save (save) or as LoRA (lora).",
            metavar="save|lora",
        ),
    ] = "save",
    serving_safe: Annotated[
        bool,
        typer.Option(
            help="Adapters: LoRA on Linear layers only (no modules_to_save, lora_bias, embeddings or lm_head); what is left out is reported with its share of the update.",
            metavar="",
        ),
    ] = False,
    bias: Annotated[
        str,
        typer.Option(
            help="Adapters: bias deltas of LoRA layers. fold: the fine-tuned bias saved as the layer's own bias (PEFT bias=lora_only); loads, applies and merges cleanly. lora_bias: the delta as lora_B.bias (PEFT lora_bias); PEFT's merge_and_unload fails half-way when a LoRA layer has no bias in the base, and a warning says so. leave_out: not written, reported with its share of the update.",
            metavar="fold|lora_bias|leave_out",
        ),
    ] = "fold",
    task_type: Annotated[
        str | None,
        typer.Option(
            help="Adapters: PEFT task_type for adapter_config.json: CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, QUESTION_ANS or FEATURE_EXTRACTION. Default: from the architectures in the base folder's config.json, else unset.",
            metavar="TYPE",
        ),
    ] = None,
    calibration: Annotated[
        list[Path] | None,
        typer.Option(
            "--calibration",
            help="Activation files (dumps or moments from capture) of the layers' inputs: matrices with calibration rows keep their outputs, not their entries (factor W S, S the Cholesky factor of XᵀX). Repeat for shards.",
            metavar="ACTS",
        ),
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    force: ForceOpt = False,
    *,
    rank_policy: RankPolicy,
    engine: dict,
    reporting: Reporting,
    world: World,  # naming it makes the command shard; the library writes on rank 0
) -> None:
    """Write a PEFT LoRA adapter of a fine-tune (--base), a low-rank factorized checkpoint, or a LoRA adapter resized.

    Each matrix is split as B = U sqrt(S), A = sqrt(S) Vh at the rank the options choose. The written files are re-opened and checked layer by layer; compress-report.parquet beside them gives rank, parameters, energy kept and relative error per tensor.

    Example: lowrank-audit compress finetuned.safetensors --base base.safetensors --energy 0.9 --out adapter/
    """
    from lowrank_audit.analyses.compress import REPORT_NAME
    from lowrank_audit.analyses.compress import compress as run_compress

    started = time.perf_counter()
    with progress_bar(reporting.progress) as progress:
        report = run_compress(
            checkpoint, out, base=base, policy=rank_policy, embeddings=embeddings, serving_safe=serving_safe, calibration=calibration or (),
            include=include or (), exclude=exclude or (), force=force, command=command_line(),
            bias=bias, task_type=task_type, progress=progress, **engine,
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    before, after = int(report["params_before"].sum()), int(report["params_after"].sum())
    left = report[report["treatment"] == "left_out"]
    if reporting.as_json:
        print_json({"out": str(out), "policy": rank_policy.describe(), "params_before": before, "params_after": after,
                    "left_out_share": float(left["update_share"].sum()), "seconds": round(elapsed, 3),
                    "rows": frame_rows(report, JSON_COLUMNS)})  # fmt: skip
        return
    if reporting.tables:
        shown = report.head(reporting.top)
        title = f"compress ({rank_policy.describe()}; {len(shown)} of {len(report)} tensors)"
        # With calibration, the outputs' error is the figure the truncation minimized.
        calibrated = bool(report["calibrated"].fillna(False).any())
        columns = TABLE + ((("output_error", "out error", "{:.3f}"),) if calibrated else ())
        out_console.print(table(shown.to_dict("records"), columns, title))
    text = f"{before:,} -> {after:,} parameters ({before / max(after, 1):.1f}x smaller)"
    if not left.empty:
        text += f"; {len(left)} tensors left out, {left['update_share'].sum():.2%} of the update"
    line(f"{text}; verified and written to {escape(str(out))} ({REPORT_NAME}) in {elapsed:.2f} s")
