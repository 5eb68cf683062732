"""How results reach the user: rich tables, JSON on stdout, progress bars on stderr.

Off a terminal (CI logs, ``| tee``, ``| grep``) the console is as wide as the longest line,
so module names are never broken across lines and every table row stays one line.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Real
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    import pandas as pd

    from lowrank_audit.engine.batches import Progress

# Wide enough for any module path; rich pads nothing to this width unless a table expands.
PIPE_WIDTH = 10_000


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1, which from `check` reads as "a rule failed": the error path decides.
        raise BrokenPipeError


def _console(stderr: bool) -> Console:
    # emoji=False: ":x" in a module path or error message must not become an emoji.
    probe = _Console(stderr=stderr, emoji=False)
    return probe if probe.is_terminal else _Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True, emoji=False)


out_console = _console(stderr=False)
err_console = _console(stderr=True)

# (report column, heading, format); a heading of "name" marks the column holding module names.
Columns = Sequence[tuple[str, str, str]]


def missing(value: Any) -> bool:
    """None, NaN, or pandas' NA/NaT; a value can be pandas' only once pandas is loaded, so
    rows rendered without a frame never import it."""
    if value is None:
        return True
    if "pandas" in sys.modules:
        return bool(sys.modules["pandas"].isna(value))
    return isinstance(value, Real) and math.isnan(value)


def fmt(value: Any, pattern: str) -> str:
    return "—" if missing(value) else escape(pattern.format(value))


def table(rows: Sequence[dict[str, Any]], columns: Columns, title: str) -> Table:
    """One table row per dict; name columns never wrap, numbers align right."""
    out = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for _, heading, pattern in columns:
        if heading in ("module", "layer", "rule"):
            out.add_column(heading, no_wrap=True, overflow="fold", min_width=16)
        else:
            numeric = pattern != "{}" or heading in (
                "rank",
                "rows",
                "cols",
                "k90",
                "k95",
                "k99",
                "signal",
                "r",
                "used",
                "settled at",
            )
            out.add_column(heading, justify="right" if numeric else "left", no_wrap=True)
    for row in rows:
        out.add_row(*(fmt(row[column], pattern) for column, _, pattern in columns))
    return out


def line(text: str) -> None:
    """A summary line on stdout (markup allowed), never wrapped."""
    out_console.print(text, highlight=False, soft_wrap=True)


def json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if hasattr(value, "tolist") and not hasattr(value, "item"):
        return json_value(value.tolist())
    if missing(value) or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def frame_rows(frame: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The frame's rows as JSON-ready dicts (nulls and non-finite numbers as ``null``)."""
    return [{c: json_value(r[c]) for c in columns} for r in frame.to_dict("records")]


def print_json(data: dict[str, Any]) -> None:
    if not out_console.quiet:  # quiet off rank 0 under torchrun
        print(json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False))


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr counting matrices and bytes per stage; yields the callback.

    Disabled (None) when asked, or when stderr is not a terminal.
    """
    if not enabled or not err_console.is_terminal:
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
        tasks: dict[str, Any] = {}

        def update(p: Progress) -> None:
            if p.stage not in tasks:
                tasks[p.stage] = bar.add_task(p.stage, total=None, size="")
            size = f"{p.bytes_done / 2**20:.1f}/{p.bytes_total / 2**20:.1f} MiB"
            bar.update(tasks[p.stage], completed=p.matrices_done, total=p.matrices_total, size=size)

        yield update


__all__ = ["err_console", "fmt", "frame_rows", "json_value", "line", "missing", "out_console", "print_json",
           "progress_bar", "table"]  # fmt: skip
