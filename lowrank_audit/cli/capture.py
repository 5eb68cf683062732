"""``lowrank-audit capture``: run a model over batches and record its Linear layers' inputs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from lowrank_audit.cli.app import command
from lowrank_audit.cli.options import DeviceOpt, ExcludeOpt, ForceOpt, IncludeOpt, Reporting, path_option
from lowrank_audit.cli.render import err_console, line, out_console, print_json, table
from lowrank_audit.wording import plural

if TYPE_CHECKING:
    from lowrank_audit.analyses.capture import Capture
    from lowrank_audit.distributed import World

# Declared here, not in options.py: only this command takes them. Defaults mirror
# lowrank_audit.analyses.capture (not imported here, so --help needs no torch).
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="MODULE:CALLABLE returning a torch.nn.Module, called with no arguments, e.g. mypkg.models:build. Imported from the current directory or PYTHONPATH, only because you name it.",
        metavar="MODULE:CALLABLE",
    ),
]
InputsOpt = Annotated[
    Path,
    path_option(
        "--inputs",
        "Safetensors file of named tensors with equal first dimension (input_ids, attention_mask, ...); each batch is passed as model(**batch).",
    ),
]
OutOpt = Annotated[
    Path,
    path_option(
        "--out",
        "Activations file to write: moments, or raw rows with --raw (refused if it exists, unless --force).",
        "-o",
    ),
]
BatchSizeOpt = Annotated[int, typer.Option(help="Rows of the inputs per forward pass.", min=1, metavar="N")]
RawOpt = Annotated[
    bool,
    typer.Option(
        "--raw", help="Write the input rows themselves ([N, d] per module) instead of their moments.", metavar=""
    ),
]
MaxRowsOpt = Annotated[
    int,
    typer.Option(
        help="With --raw: rows kept per module, the first in batch order; the rest are counted, not kept.",
        min=1,
        metavar="N",
    ),
]

TABLE = (("module", "module", "{}"), ("width", "width", "{:,}"), ("rows", "rows", "{:,}"),
         ("kept", "kept", "{:,}"), ("shares", "shares input with", "{}"))  # fmt: skip


def module_rows(result: Capture) -> list[dict[str, Any]]:
    """One dict per captured module: width, rows seen, rows kept (raw), modules sharing its input."""
    group_of = {name: group for group in result.groups for name in group}
    rows = []
    for name, seen in result.seen.items():
        held = result.rows.get(name)
        width = held.shape[1] if held is not None else result.moments[name].width
        others = [n for n in group_of.get(name, ()) if n != name]
        rows.append({"module": name, "width": width, "rows": seen, "kept": None if held is None else held.shape[0],
                     "shares": ", ".join(others) or None})  # fmt: skip
    return rows


@contextmanager
def batch_bar(enabled: bool) -> Iterator[Any]:
    """A progress bar over batches on stderr (a terminal only); yields the callback or None."""
    if not enabled or not err_console.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("capture"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
               TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("capture", total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@command()
def capture(
    model: ModelOpt,
    inputs: InputsOpt,
    out: OutOpt,
    batch_size: BatchSizeOpt = 8,
    raw: RawOpt = False,
    max_rows: MaxRowsOpt = 4096,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    *,
    reporting: Reporting,
    world: World,  # naming it makes the command shard; the library writes on rank 0
) -> None:
    """Run a model over batches and record the inputs of its Linear layers: their moments (X^T X, row sum, rows; float64), or with --raw the rows themselves.

    Every nn.Linear is hooked unless --include/--exclude (globs on module paths) narrow it. Layers called one after another on the same tensor (q/k/v) are accumulated once and written under each name. The model runs in eval mode under torch.inference_mode(), on CUDA when present (--device).

    Example: lowrank-audit capture --model mypkg.models:build --inputs batches.safetensors --out acts.safetensors
    """
    from lowrank_audit.analyses.capture import capture_to_file

    started = time.perf_counter()
    with batch_bar(reporting.progress) as progress:
        result = capture_to_file(
            model, inputs, out, batch_size=batch_size, include=include or (), exclude=exclude or (), raw=raw,
            max_rows=max_rows, device=device, force=force, progress=progress,
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    rows = module_rows(result)
    kind = "raw rows" if raw else "moments"
    if reporting.as_json:
        print_json({"out": str(out), "kind": "dumps" if raw else "moments", "batches": result.batches,
                    "seconds": round(elapsed, 3), "groups": [list(g) for g in result.groups],
                    "modules": rows})  # fmt: skip
        return
    if reporting.tables:
        columns = tuple(c for c in TABLE if c[0] != ("shares" if raw else "kept"))
        shown = rows[: reporting.top]
        out_console.print(table(shown, columns, f"capture ({len(shown)} of {len(rows)} modules)"))
    shared = f"; {len(result.groups)} groups of modules shared an input" if result.groups else ""
    line(f"{kind} of {len(rows)} Linear inputs over {plural(result.batches, 'batch', 'batches')} written to {escape(str(out))} "
         f"in {elapsed:.2f} s{shared}")  # fmt: skip
