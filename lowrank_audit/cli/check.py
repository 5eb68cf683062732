"""``lowrank-audit check``: the CI gate (exit 0 pass, 1 a rule failed, 2 bad input or a rule that cannot run)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from lowrank_audit.cli.app import command, command_line
from lowrank_audit.cli.options import (
    AlignmentOpt,
    ForceOpt,
    RankCapOpt,
    Reporting,
    SourceArg,
    base_option,
    path_option,
)
from lowrank_audit.cli.render import json_value, line, out_console, print_json, progress_bar

if TYPE_CHECKING:
    from lowrank_audit.policy import CheckResult

_STATUS = {"passed": "[green]pass[/]", "failed": "[red]FAIL[/]", "skipped": "[yellow]skip[/]"}


def check_tables(result: CheckResult, top: int) -> list[Table]:
    rules = Table(title="Rules", box=box.SIMPLE_HEAD, title_justify="left")
    rules.add_column("")
    rules.add_column("rule", no_wrap=True)
    for heading in ("layers", "findings"):
        rules.add_column(heading, justify="right")
    for r in result.results:
        checked, found = ("—", r.skipped or "") if r.skipped else (str(r.checked), str(len(r.findings)))
        rules.add_row(_STATUS[r.status], escape(r.rule), checked, escape(found))
    findings = Table(title="Findings", box=box.SIMPLE_HEAD, title_justify="left")
    findings.add_column("rule", no_wrap=True)
    findings.add_column("layer", no_wrap=True, min_width=24)
    findings.add_column("value", justify="right", no_wrap=True)
    findings.add_column("limit", no_wrap=True)
    findings.add_column("why")  # the only column that wraps: a value of — says nothing without it
    for f in result.findings[:top]:
        findings.add_row(*(escape(text) for text in (f.rule, f.layer, f.shown, f.limit, f.message)))
    return [rules, findings] if result.findings and top else [rules]


def check_json(result: CheckResult) -> dict:
    from dataclasses import asdict

    rules = [
        asdict(r) | {"status": r.status, "findings": [asdict(f) | {"value": json_value(f.value)} for f in r.findings]}
        for r in result.results
    ]
    return {"passed": result.passed, "source": result.source, "baseline": result.baseline, "policy": result.policy,
            "rules": rules}  # fmt: skip


def skips(result: CheckResult) -> str:
    """The skipped rules by reason: ``forbid-added-layers, forbid-removed-layers: needs --baseline REPORT``."""
    by_reason: dict[str, list[str]] = {}
    for r in result.results:
        if r.skipped:
            by_reason.setdefault(r.skipped, []).append(r.rule)
    return "; ".join(f"{', '.join(rules)}: {reason}" for reason, rules in by_reason.items())


def verdict(result: CheckResult, top: int, quiet: bool) -> None:
    """The one line --quiet keeps: passed or FAILED, the counts, what was skipped and why, the policy."""
    from lowrank_audit.wording import plural

    if len(result.findings) > top and not quiet:
        line(f"{plural(len(result.findings) - top, 'more finding')} not shown (--top, or --junit/--json for all)")
    text = f"[green]passed[/]: {result.headline()}" if result.passed else f"[red]FAILED[/]: {result.headline()}"
    if result.count("skipped"):
        text += f" ({escape(skips(result))})"
    line(f"{text}; policy: {escape(result.policy)}")


@command()
def check(
    source: SourceArg,
    base: Annotated[
        Path | None,
        base_option(
            "Base checkpoint: check the update SOURCE - BASE (adapter-rank rules need updates: this, or a LoRA "
            "adapter as SOURCE)."
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        path_option(
            "--baseline",
            'An earlier spectrum report of the same kind (the last release\'s): drift and added/removed-layer rules run against it. Without it, added/removed-layer rules are skipped, and drift rules stop the check (exit 2) unless their policy table says unevaluable = "skip".',
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        path_option(
            "--policy",
            "Policy file (TOML). Default: the \\[tool.lowrank-audit.check] table of the nearest pyproject.toml from the working directory up; the built-in rules (no NaN/Inf) when there is none.",
        ),
    ] = None,
    junit: Annotated[Path | None, path_option("--junit", "Write JUnit XML here: one test case per rule.")] = None,
    markdown: Annotated[
        Path | None, path_option("--markdown", "Write a Markdown summary here (append it to $GITHUB_STEP_SUMMARY).")
    ] = None,
    out: Annotated[
        Path | None,
        path_option(
            "--out",
            "With a checkpoint SOURCE: also write its spectrum report here (the next release's baseline).",
            "-o",
        ),
    ] = None,
    rank_cap: RankCapOpt = None,
    alignment: AlignmentOpt = False,
    force: ForceOpt = False,
    *,
    engine: dict,
    reporting: Reporting,
) -> None:
    """Gate a release: check its spectra against a policy; exit 0 when every rule holds, 1 when one fails, 2 on bad input or a rule that cannot run.

    Rules bound any numeric report column per layer (glob on names or roles), claim an adapter rank for an update (--base, or an adapter as SOURCE), limit drift against the last release's report (--baseline) and forbid NaN/Inf. A rule that cannot run (no --base or --baseline for it, a column absent from a report, globs matching no layer) exits 2 naming it, unless its policy table says unevaluable = "skip". See the README for every policy key.

    Example: lowrank-audit check release/ --baseline last-release.parquet --junit check.xml --markdown summary.md
    """
    from lowrank_audit.analyses.spectrum import load_spectrum
    from lowrank_audit.errors import OptionError
    from lowrank_audit.formats.ci import junit_xml
    from lowrank_audit.formats.ci import markdown as to_markdown
    from lowrank_audit.formats.report import read_report, write_report
    from lowrank_audit.io.outputs import check_target, write_text
    from lowrank_audit.policy import check as run_check
    from lowrank_audit.policy import load_policy, require_inputs

    inputs = [p for p in (source, base, baseline, policy) if p is not None]
    for path, option in ((out, "--out"), (junit, "--junit"), (markdown, "--markdown")):
        if path is not None:
            check_target(path, inputs, force=force, option=option)
    if alignment and source.suffix == ".parquet":
        raise OptionError(f"{source} is already a report: --alignment applies only when SOURCE is a checkpoint")
    if out is not None and source.suffix == ".parquet":
        raise OptionError(f"{source} is already a report; --out applies only when SOURCE is a checkpoint")
    rules = load_policy(policy)
    if source.suffix != ".parquet":  # refuse now, not after auditing (a report says what it holds)
        from lowrank_audit.io.adapters import detect

        updates = base is not None or detect(source) is not None  # a LoRA adapter's report holds updates
        require_inputs(rules, updates=updates, baseline=baseline is not None)
    before = read_report(baseline) if baseline is not None else None
    started = time.perf_counter()
    with progress_bar(reporting.progress and source.suffix != ".parquet") as progress:
        report = load_spectrum(
            source, base, rank_cap=rank_cap, progress=progress, command=command_line(), alignment=alignment, **engine
        )  # fmt: skip
    result = run_check(report, rules, baseline=before)
    seconds = time.perf_counter() - started
    if out is not None:
        write_report(report, out, force=force)
    if junit is not None:
        write_text(junit, junit_xml(result, seconds=seconds), force=force)
    if markdown is not None:
        write_text(markdown, to_markdown(result), force=force)
    if reporting.as_json:
        print_json(check_json(result))
    else:
        if not reporting.quiet:  # the rules table even with --top 0
            for t in check_tables(result, reporting.top):
                out_console.print(t)
        verdict(result, reporting.top, reporting.quiet)
    if not result.passed:
        raise typer.Exit(1)
