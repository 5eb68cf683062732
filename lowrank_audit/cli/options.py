"""Every command-line option, declared once and reused by every command that takes it.

Metavars are spelled out (``PATH``, ``GLOB``) and flags have none, so ``--help`` shows no
``<bool>`` or ``{name}`` placeholders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lowrank_audit.engine.config import DEFAULT_MAX_BATCH_MB, DEFAULT_METHOD  # noqa: F401 - the commands take their defaults from here


def _flag(*names: str, help: str) -> Any:
    return typer.Option(*names, help=help, metavar="")


def base_option(help: str) -> Any:
    """``--base``: the help says what the update means for the command."""
    return typer.Option("--base", "-b", help=help, metavar="PATH")


def path_option(name: str, help: str, *short: str) -> Any:
    """An output or input path option (``--out``, ``--junit``, ...)."""
    return typer.Option(name, *short, help=help, metavar="PATH")


def path_argument(metavar: str, help: str) -> Any:
    return typer.Argument(help=help, metavar=metavar, show_default=False)


CheckpointArg = Annotated[
    Path,
    path_argument("CHECKPOINT", "Checkpoint: .safetensors, .bin/.pt/.pth, .npz, or a Hugging Face model folder."),
]
SourceArg = Annotated[Path, path_argument("SOURCE", "A spectrum report (.parquet) or a checkpoint to audit first.")]

# Selection.
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include", "-i", help="Glob on tensor names to use; repeat for several. Default: all.", metavar="GLOB"
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", "-x", help="Glob on tensor names to leave out; repeat for several.", metavar="GLOB"),
]

# The engine (lowrank_audit.engine.config.EngineConfig): the same options, defaults and help everywhere.
MethodOpt = Annotated[
    str,
    typer.Option(
        help="exact: full SVD. randomized: top singular values only (Halko et al.), grown until they hold the energy asked (99 % for reports). auto: exact when min(rows, cols) <= 1024, randomized above. Truncated rows leave whole-spectrum figures empty.",
        metavar="auto|exact|randomized",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, or cuda[:N].", metavar="DEVICE")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="Precision of the decomposition: float32 or float64. Half-precision inputs are upcast.",
        metavar="float32|float64",
    ),
]
MaxBatchOpt = Annotated[
    float, typer.Option(help="Memory budget for one batch of stacked same-shape matrices, in MiB.", metavar="MIB")
]
RankCapOpt = Annotated[
    int | None,
    typer.Option(
        help="With randomized/auto: compute at most this many singular values per matrix.", min=1, metavar="K"
    ),
]
SeedOpt = Annotated[
    int, typer.Option(help="Seed of the randomized method: the same seed gives the same output.", metavar="INT")
]


def engine_options(
    method: str, device: str, dtype: str, max_batch_mb: float, seed: int, rank_cap: int | None = None
) -> dict[str, Any]:
    """The engine options as the library's keyword arguments."""
    options = {"method": method, "device": device, "dtype": dtype, "max_batch_mb": max_batch_mb, "seed": seed}
    return options | ({"rank_cap": rank_cap} if rank_cap is not None else {})


# Ranks (lowrank_audit.ranks.RankPolicy), shared by recommend and compress.
EnergyOpt = Annotated[
    float | None,
    typer.Option(
        help="Per layer, the smallest rank whose singular values hold this share of ||W||_F^2, in (0, 1]. The default (0.95) when no other way is given.",
        metavar="E",
    ),
]
RankOpt = Annotated[
    int | None, typer.Option("--rank", help="The same rank for every layer (capped at min(rows, cols)).", metavar="R")
]
BudgetOpt = Annotated[
    int | None,
    typer.Option(
        help="Total adapter parameters, spent greedily on the components with the most energy per parameter (rank r of an m x n matrix costs r(m+n)).",
        metavar="N",
    ),
]
AvgRankOpt = Annotated[
    float | None, typer.Option(help="A budget written as an average rank: R * sum(m + n) parameters.", metavar="R")
]
MinRankOpt = Annotated[int, typer.Option(help="No layer below this rank.", metavar="R")]
MaxRankOpt = Annotated[int | None, typer.Option(help="No layer above this rank.", metavar="R")]
RoundToOpt = Annotated[
    int,
    typer.Option(
        help="Round ranks up to a multiple of this (e.g. 8 for serving engines); caps still apply.", metavar="N"
    ),
]

# Output and reporting.
ForceOpt = Annotated[bool, _flag("--force", "-f", help="Replace output files that exist (refused otherwise).")]
QuietOpt = Annotated[
    bool, _flag("--quiet", "-q", help="No tables and no progress bar: errors and the one-line verdict only.")
]
JsonOpt = Annotated[
    bool, _flag("--json", help="Print the result as JSON on stdout instead of tables (no progress bar either).")
]
TopOpt = Annotated[int, typer.Option(help="Rows shown in the table (the files hold them all).", min=0, metavar="N")]
