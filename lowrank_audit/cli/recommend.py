"""``lowrank-audit recommend``: per-layer LoRA ranks from a report or a checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from rich.markup import escape

from lowrank_audit.cli.app import command, command_line
from lowrank_audit.cli.options import ForceOpt, Reporting, SourceArg, base_option, path_option
from lowrank_audit.cli.render import frame_rows, line, out_console, print_json, progress_bar, table

if TYPE_CHECKING:
    from lowrank_audit.distributed import World
    from lowrank_audit.ranks import RankPolicy

TABLE = (("module", "module", "{}"), ("rows", "rows", "{}"), ("cols", "cols", "{}"), ("rank", "rank", "{}"),
         ("energy_kept", "energy kept", "{:.1%}"), ("params", "params", "{:,}"))  # fmt: skip
JSON_COLUMNS = ("name", "module", "rows", "cols", "rank", "energy_kept", "params")


@command()
def recommend(
    source: SourceArg,
    base: Annotated[Path | None, base_option("Base checkpoint: recommend ranks for the update SOURCE - BASE.")] = None,
    out: Annotated[Path | None, path_option("--out", "Write the ranks to this Parquet file.", "-o")] = None,
    peft_config: Annotated[
        Path | None,
        path_option("--peft-config", "Write a PEFT LoraConfig JSON (adapter_config.json) with these ranks per module."),
    ] = None,
    force: ForceOpt = False,
    *,
    rank_policy: RankPolicy,
    engine: dict,
    reporting: Reporting,
    world: World,
) -> None:
    """Per-layer LoRA ranks: by energy, a fixed rank, or a parameter budget spread where it buys most.

    Example: lowrank-audit recommend finetuned.safetensors --base base.safetensors --avg-rank 8 --peft-config adapter_config.json
    """
    from lowrank_audit.analyses.recommend import RANKS_SCHEMA
    from lowrank_audit.analyses.recommend import peft_config as to_peft_config
    from lowrank_audit.analyses.recommend import recommend as run_recommend
    from lowrank_audit.formats.report import write_report
    from lowrank_audit.io.outputs import check_target, write_text

    inputs = [source] + ([base] if base else [])
    for path, option in ((out, "--out"), (peft_config, "--peft-config")):
        if path is not None:
            check_target(path, inputs, force=force, option=option)
    started = time.perf_counter()
    with progress_bar(reporting.progress) as progress:
        ranks = run_recommend(source, rank_policy, base=base, command=command_line(), progress=progress, **engine)
    elapsed = time.perf_counter() - started

    def write() -> None:  # rank 0 alone, under torchrun
        if out is not None:
            write_report(ranks, out, schema=RANKS_SCHEMA, force=force)
        if peft_config is not None:
            write_text(peft_config, json.dumps(to_peft_config(ranks), indent=2) + "\n", force=force)

    world.on_main(write)
    unchanged = ranks.attrs["lowrank_audit"].get("unchanged", [])
    nonfinite = ranks.attrs["lowrank_audit"].get("nonfinite", {})
    total = int(ranks["params"].sum())
    if reporting.as_json:
        print_json({"policy": rank_policy.describe(), "layers": len(ranks), "params": total, "unchanged": unchanged,
                    "nonfinite": nonfinite, "ranks": str(out) if out else None, "peft_config": str(peft_config) if peft_config else None,
                    "rows": frame_rows(ranks, JSON_COLUMNS)})  # fmt: skip
        return
    if reporting.tables:
        shown = ranks.head(reporting.top)
        title = f"LoRA ranks ({rank_policy.describe()}; {len(shown)} of {len(ranks)} layers)"
        out_console.print(table(shown.to_dict("records"), TABLE, title))
    for name, count in nonfinite.items():
        line(f"[red]non-finite:[/] {escape(name)} has {count:,} NaN/Inf entries; no rank")
    mean = f"{ranks['rank'].mean():.1f}" if len(ranks) else "—"
    text = f"{len(ranks)} layers, {total:,} adapter parameters, mean rank {mean}"
    text += f"; {len(unchanged)} unchanged matrices left out" if unchanged else ""
    text += f"; {len(nonfinite)} non-finite matrices left out" if nonfinite else ""
    text += f"; ranks written to {escape(str(out))}" if out is not None else ""
    text += f"; PEFT config written to {escape(str(peft_config))}" if peft_config is not None else ""
    line(f"{text} ({elapsed:.2f} s)")
