"""The ``lowrank-audit`` command line: parse, call one library function, render, map errors.

Heavy modules (torch, pandas) are imported inside commands so ``--help`` stays instant.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lowrank_audit import __version__
from lowrank_audit.errors import LowrankAuditError

if TYPE_CHECKING:
    import pandas as pd

    from lowrank_audit.policy import CheckResult
    from lowrank_audit.ranks import RankPolicy

app = typer.Typer(
    name="lowrank-audit",
    help="Spectral audits of neural-network checkpoints: singular values of every weight matrix or fine-tuning update.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out_console = Console()
err_console = Console(stderr=True)

# Columns of the summary table after the name: (report column, heading, format).
_TABLE = (
    ("matrix", "shape", "{}"),
    ("spectral_norm", "σ₁", "{:.3g}"),
    ("effective_rank", "erank", "{:.1f}"),
    ("k90", "k90", "{}"),
    ("k95", "k95", "{}"),
    ("k99", "k99", "{}"),
    ("signal_rank", "signal", "{}"),
    ("k95_ratio", "k95%", "{:.0%}"),
)
_JSON_COLUMNS = (
    "name", "expert", "kind", "role", "layer", "rows", "cols", "dtype", "frobenius_norm", "spectral_norm",
    "nuclear_norm", "stable_rank", "effective_rank", "numerical_rank", "k90", "k95", "k99", "k95_ratio",
    "signal_rank", "condition_number", "nonfinite", "method", "k",
)  # fmt: skip


# Options and arguments shared by several commands.
def _base_option(help: str) -> Any:
    return typer.Option("--base", "-b", help=help)


DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, or cuda[:N].")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
SourceArg = Annotated[
    Path, typer.Argument(help="A spectrum report (.parquet) or a checkpoint to audit first.", show_default=False)
]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn our errors into one red line and their exit code; only our own bugs print a traceback."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            err_console.print(f"[yellow]Warning:[/] {escape(str(w.message))}", highlight=False)
    except LowrankAuditError as err:
        # escape: tensor names and TOML keys hold brackets that rich would read as markup
        err_console.print(f"[red]Error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None


def _version_callback(value: bool) -> None:
    if value:
        out_console.print(f"lowrank-audit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Spectral audits of neural-network checkpoints."""


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def _fmt(value: Any, pattern: str) -> str:
    return "—" if _missing(value) else escape(pattern.format(value))


def _summary_table(frame: pd.DataFrame, top: int) -> Table:
    ranked = frame[frame["k95_ratio"].notna()].sort_values(["k95_ratio", "name"]).head(top)
    what = "updates (checkpoint - base)" if (frame["kind"] == "delta").all() else "matrices"
    table = Table(
        title=f"Most low-rank {what} ({len(ranked)} of {len(frame)}, by k95%)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("module", overflow="fold", ratio=1, min_width=16)
    for _, heading, _ in _TABLE:
        table.add_column(heading, justify="left" if heading == "shape" else "right", no_wrap=True)
    for row in ranked.to_dict("records"):
        name = row["module"] + ("" if _missing(row["expert"]) else f"[{row['expert']}]")
        row["matrix"] = f"{row['rows']}×{row['cols']}"
        table.add_row(escape(name), *(_fmt(row[col], fmt) for col, _, fmt in _TABLE))
    return table


def _json_value(value: Any) -> Any:
    if _missing(value) or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _json_summary(frame: pd.DataFrame, out: Path | None) -> str:
    meta = frame.attrs["lowrank_audit"]
    rows = [{c: _json_value(r[c]) for c in _JSON_COLUMNS} for r in frame.to_dict("records")]
    summary = {
        "tool_version": meta["tool_version"],
        "inputs": meta["inputs"],
        "device": meta["device"],
        "report": str(out) if out else None,
        "matrices": len(frame),
        "nonfinite_matrices": int((frame["nonfinite"] > 0).sum()),
        "skipped": meta["skipped"],
        "unpaired": meta["unpaired"],
        "rows": rows,
    }
    return json.dumps(summary, indent=2, allow_nan=False)


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr counting matrices and bytes; yields the callback."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} matrices"),
        TextColumn("{task.fields[size]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("SVD", total=None, size="")

        def update(p: Any) -> None:
            size = f"{p.bytes_done / 2**20:.1f}/{p.bytes_total / 2**20:.1f} MiB"
            bar.update(task, completed=p.matrices_done, total=p.matrices_total, size=size)

        yield update


@app.command()
def spectrum(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint: .safetensors, .bin/.pt/.pth, .npz, or a Hugging Face model folder.", show_default=False
        ),
    ],
    base: Annotated[
        Path | None, _base_option("Base checkpoint: audit the update CHECKPOINT - BASE instead of the weights.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write the full report (one row per matrix, singular values included) to this Parquet file.",
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", "-i", help="Glob on tensor names to audit; repeat for several. Default: all."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", "-x", help="Glob on tensor names to leave out; repeat for several."),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str, typer.Option(help="Precision of the decomposition: float32 or float64. Half-precision inputs are upcast.")
    ] = "float32",
    max_batch_mb: Annotated[
        float, typer.Option(help="Memory budget for one batch of stacked same-shape matrices, in MiB.")
    ] = 256.0,
    method: Annotated[
        str,
        typer.Option(
            help="exact: full SVD. randomized: top singular values only (Halko et al.), grown until they hold 99 % of the energy. auto: exact when min(rows, cols) <= 1024, randomized above. Truncated rows leave whole-spectrum figures empty."
        ),
    ] = "auto",
    rank_cap: Annotated[
        int | None,
        typer.Option(help="With randomized/auto: compute at most this many singular values per matrix.", min=1),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the randomized method: the same seed gives the same report.")] = 0,
    top: Annotated[int, typer.Option(help="Rows in the summary table.", min=0)] = 20,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print a machine-readable summary (all rows, no singular values) on stdout instead of the table.",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Singular-value spectrum of every weight matrix, or of every fine-tuning update with --base.

    Audits every floating tensor with two or more dimensions: 3-D tensors as stacked experts, convolution kernels flattened to out x (in*kh*kw). Reports norms, stable and effective rank, energy ranks k90/k95/k99, the Gavish-Donoho signal rank and more; --out writes them all, with the singular values, to Parquet.

    Example: lowrank-audit spectrum finetuned.safetensors --base base.safetensors --out r.parquet
    """
    with user_errors():
        from lowrank_audit.audit import spectrum as run_spectrum
        from lowrank_audit.report import check_output_path, write_report

        if out is not None:
            check_output_path(out, [checkpoint] + ([base] if base else []))
        command = shlex.join(["lowrank-audit", *sys.argv[1:]])
        started = time.perf_counter()
        with _progress_bar(not quiet and err_console.is_terminal) as progress:
            frame = run_spectrum(
                checkpoint, base, include=include or (), exclude=exclude or (), device=device, dtype=dtype,
                max_batch_mb=max_batch_mb, method=method, rank_cap=rank_cap, seed=seed, command=command,
                progress=progress,
            )  # fmt: skip
        elapsed = time.perf_counter() - started
        if out is not None:
            write_report(frame, out)
        if as_json:
            print(_json_summary(frame, out))
            return
        _render(frame, top, elapsed, out)


def _render(frame: pd.DataFrame, top: int, elapsed: float, out: Path | None) -> None:
    meta = frame.attrs["lowrank_audit"]
    if top:
        out_console.print(_summary_table(frame, top))
    bad = frame[frame["nonfinite"] > 0]
    for row in bad.to_dict("records"):
        out_console.print(
            f"[red]non-finite:[/] {row['name']} has {row['nonfinite']} NaN/Inf entries; not decomposed", soft_wrap=True
        )
    capped = int((frame["k95"].isna() & (frame["method"] == "randomized")).sum())
    if capped:
        out_console.print(f"{capped} matrices: 95 % of the energy not reached within --rank-cap; k95 left empty")
    tensors = frame["name"].nunique()
    line = f"Audited {len(frame)} matrices from {tensors} tensors on {meta['device']} in {elapsed:.2f} s"
    line += f"; {len(meta['skipped'])} tensors skipped (not matrices)" if meta["skipped"] else ""
    out_console.print(line + (f"; report written to {out}" if out else ""), highlight=False, soft_wrap=True)


# Rank options shared by recommend and compress (lowrank_audit.ranks).
EnergyOpt = Annotated[
    float | None,
    typer.Option(
        help="Per layer, the smallest rank whose singular values hold this share of ||W||_F^2, in (0, 1]. The default (0.95) when no other way is given."
    ),
]
RankOpt = Annotated[
    int | None, typer.Option("--rank", help="The same rank for every layer (capped at min(rows, cols)).")
]
BudgetOpt = Annotated[
    int | None,
    typer.Option(
        help="Total adapter parameters, spent greedily on the components with the most energy per parameter (rank r of an m x n matrix costs r(m+n))."
    ),
]
AvgRankOpt = Annotated[
    float | None, typer.Option(help="A budget written as an average rank: R * sum(m + n) parameters.")
]
MinRankOpt = Annotated[int, typer.Option(help="No layer below this rank.")]
MaxRankOpt = Annotated[int | None, typer.Option(help="No layer above this rank.")]
RoundToOpt = Annotated[
    int, typer.Option(help="Round ranks up to a multiple of this (e.g. 8 for serving engines); caps still apply.")
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace the output if it exists.")]
MethodOpt = Annotated[
    str, typer.Option(help="SVD method: exact, randomized, or auto (exact when min(rows, cols) <= 1024).")
]


def _policy(
    energy: float | None, rank: int | None, budget_params: int | None, avg_rank: float | None, min_rank: int,
    max_rank: int | None, round_to: int,
) -> RankPolicy:  # fmt: skip
    from lowrank_audit.ranks import RankPolicy

    return RankPolicy.create(
        energy=energy, rank=rank, budget_params=budget_params, avg_rank=avg_rank, min_rank=min_rank,
        max_rank=max_rank, round_to=round_to,
    )  # fmt: skip


def _rank_table(frame: pd.DataFrame, title: str, columns: tuple[tuple[str, str, str], ...]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for _, heading, _ in columns:
        if heading == "layer":
            table.add_column(heading, overflow="fold", min_width=24)
        else:
            table.add_column(heading, justify="left" if heading == "treatment" else "right", no_wrap=True)
    for row in frame.to_dict("records"):
        table.add_row(*(_fmt(row[column], pattern) for column, _, pattern in columns))
    return table


@app.command()
def recommend(
    source: SourceArg,
    base: Annotated[Path | None, _base_option("Base checkpoint: recommend ranks for the update SOURCE - BASE.")] = None,
    energy: EnergyOpt = None,
    rank: RankOpt = None,
    budget_params: BudgetOpt = None,
    avg_rank: AvgRankOpt = None,
    min_rank: MinRankOpt = 1,
    max_rank: MaxRankOpt = None,
    round_to: RoundToOpt = 1,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the ranks to this Parquet file.")] = None,
    peft_config: Annotated[
        Path | None,
        typer.Option(help="Write a PEFT LoraConfig JSON (adapter_config.json) with these ranks per module."),
    ] = None,
    method: MethodOpt = "exact",
    device: DeviceOpt = "auto",
) -> None:
    """Per-layer LoRA ranks: by energy, a fixed rank, or a parameter budget spread where it buys most.

    Example: lowrank-audit recommend finetuned.safetensors --base base.safetensors --avg-rank 8 --peft-config adapter_config.json
    """
    with user_errors():
        from lowrank_audit.audit import load_spectrum
        from lowrank_audit.recommend import RANKS_SCHEMA
        from lowrank_audit.recommend import peft_config as to_peft_config
        from lowrank_audit.recommend import recommend as run_recommend
        from lowrank_audit.report import check_output_path, write_report, write_text

        policy = _policy(energy, rank, budget_params, avg_rank, min_rank, max_rank, round_to)
        inputs = [source] + ([base] if base else [])
        for path, option in ((out, "--out"), (peft_config, "--peft-config")):
            if path is not None:
                check_output_path(path, inputs, option=option)
        report = load_spectrum(source, base, method=method, device=device)
        ranks = run_recommend(report, policy)
        columns = (("name", "layer", "{}"), ("rows", "rows", "{}"), ("cols", "cols", "{}"), ("rank", "rank", "{}"),
                   ("energy_kept", "energy kept", "{:.1%}"), ("params", "params", "{:,}"))  # fmt: skip
        out_console.print(_rank_table(ranks, f"LoRA ranks ({policy.describe()})", columns))
        total = int(ranks["params"].sum())
        line = f"{len(ranks)} layers, {total:,} adapter parameters, mean rank {ranks['rank'].mean():.1f}"
        if out is not None:
            write_report(ranks, out, schema=RANKS_SCHEMA)
            line += f"; ranks written to {out}"
        if peft_config is not None:
            write_text(peft_config, json.dumps(to_peft_config(ranks), indent=2) + "\n")
            line += f"; PEFT config written to {peft_config}"
        out_console.print(line, highlight=False, soft_wrap=True)


@app.command()
def compress(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint to compress (the fine-tune, with --base).", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output folder (refused if it exists, unless --force).", show_default=False),
    ],
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            "-b",
            help="Base checkpoint: write the update CHECKPOINT - BASE as a PEFT LoRA adapter. Without it, write a factorized checkpoint.",
        ),
    ] = None,
    energy: EnergyOpt = None,
    rank: RankOpt = None,
    budget_params: BudgetOpt = None,
    avg_rank: AvgRankOpt = None,
    min_rank: MinRankOpt = 1,
    max_rank: MaxRankOpt = None,
    round_to: RoundToOpt = 1,
    embeddings: Annotated[
        str, typer.Option(help="Adapters: embeddings and lm_head as full modules_to_save (save) or as LoRA (lora).")
    ] = "save",
    serving_safe: Annotated[
        bool,
        typer.Option(
            help="Adapters: LoRA on Linear layers only (no modules_to_save, lora_bias, embeddings or lm_head); what is left out is reported with its share of the update."
        ),
    ] = False,
    include: Annotated[
        list[str] | None, typer.Option("--include", "-i", help="Glob on tensor names to compress.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", "-x", help="Glob on tensor names to leave alone.")
    ] = None,
    method: MethodOpt = "auto",
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the randomized method.")] = 0,
    force: ForceOpt = False,
) -> None:
    """Write a PEFT LoRA adapter of a fine-tune (--base), or a low-rank factorized checkpoint.

    Each matrix is split as B = U sqrt(S), A = sqrt(S) Vh at the rank the options choose. The written files are re-opened and checked layer by layer; compress-report.parquet beside them gives rank, parameters, energy kept and relative error per tensor.

    Example: lowrank-audit compress finetuned.safetensors --base base.safetensors --energy 0.9 --out adapter/
    """
    with user_errors():
        from lowrank_audit.compress import REPORT_NAME
        from lowrank_audit.compress import compress as run_compress

        policy = _policy(energy, rank, budget_params, avg_rank, min_rank, max_rank, round_to)
        started = time.perf_counter()
        report = run_compress(
            checkpoint, out, base=base, policy=policy, embeddings=embeddings, serving_safe=serving_safe,
            include=include or (), exclude=exclude or (), force=force, method=method, device=device, seed=seed,
            command=shlex.join(["lowrank-audit", *sys.argv[1:]]),
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        columns = (("name", "layer", "{}"), ("treatment", "treatment", "{}"), ("rank", "rank", "{}"),
                   ("params_after", "params", "{:,}"), ("energy_kept", "kept", "{:.1%}"),
                   ("relative_error", "error", "{:.3f}"))  # fmt: skip
        out_console.print(_rank_table(report, f"compress ({policy.describe()})", columns))
        before, after = int(report["params_before"].sum()), int(report["params_after"].sum())
        left = report[report["treatment"] == "left_out"]
        line = f"{before:,} -> {after:,} parameters ({before / max(after, 1):.1f}x smaller)"
        if not left.empty:
            line += f"; {len(left)} tensors left out, {left['update_share'].sum():.2%} of the update"
        out_console.print(
            f"{line}; verified and written to {out} ({REPORT_NAME}) in {elapsed:.2f} s", highlight=False, soft_wrap=True
        )


@app.command()
def expand(
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder (or its model.safetensors) written by compress without --base.", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dense .safetensors file to write.", show_default=False)],
    force: ForceOpt = False,
) -> None:
    """Multiply a factorized checkpoint back into a dense one: original names, shapes and dtypes."""
    with user_errors():
        from lowrank_audit.compress import expand as run_expand

        written = run_expand(source, out, force=force)
        out_console.print(f"dense checkpoint written to {written}", highlight=False, soft_wrap=True)


_STATUS = {"passed": "[green]pass[/]", "failed": "[red]FAIL[/]", "skipped": "[yellow]skip[/]"}


def _check_tables(result: CheckResult, top: int) -> list[Table]:
    rules = Table(title="Rules", box=box.SIMPLE_HEAD, title_justify="left")
    for heading in ("", "rule", "layers", "findings"):
        rules.add_column(heading, justify="right" if heading in ("layers", "findings") else "left")
    for r in result.results:
        checked, found = ("—", r.skipped or "") if r.skipped else (str(r.checked), str(len(r.findings)))
        rules.add_row(_STATUS[r.status], escape(r.rule), checked, escape(found))
    findings = Table(title="Findings", box=box.SIMPLE_HEAD, title_justify="left", expand=True)
    findings.add_column("rule", overflow="fold", ratio=1)
    findings.add_column("layer", overflow="fold", ratio=2, min_width=24)
    findings.add_column("value", justify="right", no_wrap=True)
    findings.add_column("limit", no_wrap=True)
    for f in result.findings[:top]:
        findings.add_row(*(escape(text) for text in (f.rule, f.layer, f.shown, f.limit)))
    return [rules, findings] if result.findings and top else [rules]


def _check_json(result: CheckResult) -> str:
    from dataclasses import asdict

    rules = [
        asdict(r) | {"status": r.status, "findings": [asdict(f) | {"value": _json_value(f.value)} for f in r.findings]}
        for r in result.results
    ]
    summary = {"passed": result.passed, "source": result.source, "baseline": result.baseline,
               "policy": result.policy, "rules": rules}  # fmt: skip
    return json.dumps(summary, indent=2, allow_nan=False, ensure_ascii=False)


@app.command()
def check(
    source: SourceArg,
    base: Annotated[
        Path | None, _base_option("Base checkpoint: check the update SOURCE - BASE (adapter-rank rules need it).")
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="An earlier spectrum report of the same kind (the last release's): drift and added/removed-layer rules run against it; without it they are skipped."
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="Policy file (TOML). Default: the \\[tool.lowrank-audit.check] table of the nearest pyproject.toml from the working directory up; the built-in rules (no NaN/Inf) when there is none."
        ),
    ] = None,
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here: one test case per rule.")] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Write a Markdown summary here (append it to $GITHUB_STEP_SUMMARY).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="With a checkpoint SOURCE: also write its spectrum report here (the next release's baseline).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON on stdout instead of tables.")
    ] = False,
    method: MethodOpt = "auto",
    device: DeviceOpt = "auto",
    top: Annotated[int, typer.Option(help="Findings shown in the table (the files hold them all).", min=0)] = 30,
    quiet: QuietOpt = False,
) -> None:
    """Gate a release: check its spectra against a policy; exit 0 when every rule holds, 1 when one fails, 2 on bad input.

    Rules bound any numeric report column per layer (glob on names or roles), claim an adapter rank for an update (--base), limit drift against the last release's report (--baseline) and forbid NaN/Inf. See the README for every policy key.

    Example: lowrank-audit check release/ --baseline last-release.parquet --junit check.xml --markdown summary.md
    """
    with user_errors():
        from lowrank_audit.audit import load_spectrum
        from lowrank_audit.errors import OptionError
        from lowrank_audit.formats.ci import junit_xml
        from lowrank_audit.formats.ci import markdown as to_markdown
        from lowrank_audit.policy import check as run_check
        from lowrank_audit.policy import load_policy
        from lowrank_audit.report import check_output_path, read_report, write_report, write_text

        inputs = [p for p in (source, base, baseline, policy) if p is not None]
        for path, option in ((out, "--out"), (junit, "--junit"), (markdown, "--markdown")):
            if path is not None:
                check_output_path(path, inputs, option=option)
        if out is not None and source.suffix == ".parquet":
            raise OptionError(f"{source} is already a report; --out applies only when SOURCE is a checkpoint")
        rules = load_policy(policy)
        before = read_report(baseline) if baseline is not None else None
        started = time.perf_counter()
        with _progress_bar(not quiet and err_console.is_terminal and source.suffix != ".parquet") as progress:
            report = load_spectrum(source, base, method=method, device=device, progress=progress,
                                   command=shlex.join(["lowrank-audit", *sys.argv[1:]]))  # fmt: skip
        result = run_check(report, rules, baseline=before)
        seconds = time.perf_counter() - started
        if out is not None:
            write_report(report, out)
        if junit is not None:
            write_text(junit, junit_xml(result, seconds=seconds))
        if markdown is not None:
            write_text(markdown, to_markdown(result))
        if as_json:
            print(_check_json(result))
        else:
            for table in _check_tables(result, top):
                out_console.print(table)
            _check_summary(result, top)
    if not result.passed:
        raise typer.Exit(1)


def _check_summary(result: CheckResult, top: int) -> None:
    if len(result.findings) > top:
        out_console.print(f"{len(result.findings) - top} more findings not shown (--top, or --junit/--json for all)")
    skipped = result.count("skipped")
    if result.passed:
        line = f"[green]passed[/]: {result.headline()}" + (f", {skipped} skipped" if skipped else "")
    else:
        line = f"[red]FAILED[/]: {result.headline()}"
    out_console.print(f"{line}; policy: {escape(result.policy)}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()
