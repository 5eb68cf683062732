"""Every command-line option, declared once and reused by every command that takes it.

Metavars are spelled out (``PATH``, ``GLOB``) and flags have none, so ``--help`` shows no
``<bool>`` or ``{name}`` placeholders.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from lowrank_audit.distributed import DEFAULT_TIMEOUT
from lowrank_audit.engine.config import DEFAULT_MAX_BATCH_MB, DEFAULT_METHOD


def _flag(*names: str, help: str, panel: str | None = None) -> Any:
    return typer.Option(*names, help=help, metavar="", rich_help_panel=panel)


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
    path_argument(
        "CHECKPOINT",
        "Checkpoint: .safetensors, .bin/.pt/.pth, .npz, a Hugging Face model folder or id (org/name), or a LoRA "
        "adapter (PEFT folder or kohya file).",
    ),
]
SourceArg = Annotated[
    Path,
    path_argument("SOURCE", "A spectrum report (.parquet), or a checkpoint, hub id or LoRA adapter to audit first."),
]

# Selection.
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        "-i",
        help="Glob on names to use (tensor names; module paths for activations); repeat for several. Default: all.",
        metavar="GLOB",
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        "-x",
        help="Glob on names to leave out (tensor names; module paths for activations); repeat for several.",
        metavar="GLOB",
    ),
]

# The engine (lowrank_audit.engine.config.EngineConfig): the same options, defaults and help everywhere.
MethodOpt = Annotated[
    str,
    typer.Option(
        help="exact: full SVD. randomized: top singular values only (Halko et al.), grown until the energy ranks of a report are certified within 1 % or lie in the noise floor (null, with an interval that holds them), or the rank asked is found. auto: exact when min(rows, cols) <= 1024, randomized above. Truncated rows leave whole-spectrum figures empty.",
        rich_help_panel="Engine",
        metavar="auto|exact|randomized",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        help="auto (CUDA when present; under torchrun the local rank's GPU), cpu, or cuda[:N].",
        rich_help_panel="Engine",
        metavar="DEVICE",
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="Precision of the decomposition: float32 or float64. Half-precision inputs are upcast.",
        rich_help_panel="Engine",
        metavar="float32|float64",
    ),
]
MaxBatchOpt = Annotated[
    float,
    typer.Option(
        help="Memory budget for one batch of stacked same-shape matrices, in MiB.",
        rich_help_panel="Engine",
        metavar="MIB",
    ),
]
AlignmentOpt = Annotated[
    bool,
    typer.Option(
        "--alignment",
        help="With --base: add base_angle and intruder_dimensions to each row, where the update departs from "
        "the base (three exact SVDs per matrix; implied for a LoRA adapter with --base).",
        metavar="",
    ),
]
RankCapOpt = Annotated[
    int | None,
    typer.Option(
        help="With randomized/auto: compute at most this many singular values per matrix.",
        min=1,
        rich_help_panel="Engine",
        metavar="K",
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option(
        help="Seed of the randomized method: the same seed gives the same output.",
        rich_help_panel="Engine",
        metavar="INT",
    ),
]


# Ranks (lowrank_audit.ranks.RankPolicy), shared by recommend and compress.
EnergyOpt = Annotated[
    float | None,
    typer.Option(
        help="Per layer, the smallest rank whose singular values hold this share of ||W||_F^2, in (0, 1]. The default (0.95) when no other way is given.",
        rich_help_panel="Ranks",
        metavar="E",
    ),
]
RankOpt = Annotated[
    int | None,
    typer.Option(
        "--rank",
        help="The same rank for every layer (capped at min(rows, cols)).",
        rich_help_panel="Ranks",
        metavar="R",
    ),
]
BudgetOpt = Annotated[
    int | None,
    typer.Option(
        help="Total adapter parameters, spent greedily on the components with the most energy per parameter (rank r of an m x n matrix costs r(m+n)).",
        rich_help_panel="Ranks",
        metavar="N",
    ),
]
AvgRankOpt = Annotated[
    float | None,
    typer.Option(
        help="A budget written as an average rank: R * sum(m + n) parameters.", rich_help_panel="Ranks", metavar="R"
    ),
]
MinRankOpt = Annotated[int, typer.Option(help="No layer below this rank.", rich_help_panel="Ranks", metavar="R")]
MaxRankOpt = Annotated[int | None, typer.Option(help="No layer above this rank.", rich_help_panel="Ranks", metavar="R")]
CountFloorOpt = Annotated[
    bool,
    _flag(
        "--count-floor",
        help="Count the precision floor (the energy that rounding to the stored dtype puts into an update) as "
        "energy to keep. By default --energy applies to the energy above it, so rounding noise of an fp16/bf16 "
        "update does not inflate ranks.",
        panel="Ranks",
    ),
]
RoundToOpt = Annotated[
    int,
    typer.Option(
        help="Round ranks up to a multiple of this (e.g. 8 for serving engines); caps still apply.",
        rich_help_panel="Ranks",
        metavar="N",
    ),
]

# Output and reporting.
ForceOpt = Annotated[
    bool, _flag("--force", "-f", help="Replace output files that exist (refused otherwise).", panel="Output")
]
QuietOpt = Annotated[
    bool,
    _flag("--quiet", "-q", help="No tables and no progress bar: errors and the one-line verdict only.", panel="Output"),
]
JsonOpt = Annotated[
    bool,
    _flag(
        "--json", help="Print the result as JSON on stdout instead of tables (no progress bar either).", panel="Output"
    ),
]
TopOpt = Annotated[
    int,
    typer.Option(
        help="Rows shown in the table (the files hold them all).", min=0, rich_help_panel="Output", metavar="N"
    ),
]


@dataclass(frozen=True)
class Reporting:
    """How a command shows its result: ``--top``, ``--json``, ``--quiet``."""

    top: int
    as_json: bool
    quiet: bool

    @property
    def tables(self) -> bool:
        return bool(self.top) and not (self.quiet or self.as_json)

    @property
    def progress(self) -> bool:
        return not (self.quiet or self.as_json)


def _engine(method: MethodOpt = DEFAULT_METHOD, device: DeviceOpt = "auto", dtype: DtypeOpt = "float32",
            max_batch_mb: MaxBatchOpt = DEFAULT_MAX_BATCH_MB, seed: SeedOpt = 0) -> dict[str, Any]:  # fmt: skip
    return {"method": method, "device": device, "dtype": dtype, "max_batch_mb": max_batch_mb, "seed": seed}


def _ranks(energy: EnergyOpt = None, rank: RankOpt = None, budget_params: BudgetOpt = None,
           avg_rank: AvgRankOpt = None, min_rank: MinRankOpt = 1, max_rank: MaxRankOpt = None,
           round_to: RoundToOpt = 1, count_floor: CountFloorOpt = False) -> Any:  # fmt: skip
    from lowrank_audit.ranks import RankPolicy

    return RankPolicy.create(energy=energy, rank=rank, budget_params=budget_params, avg_rank=avg_rank,
                             min_rank=min_rank, max_rank=max_rank, round_to=round_to,
                             above_floor=not count_floor)  # fmt: skip


def _reporting(top: TopOpt = 20, as_json: JsonOpt = False, quiet: QuietOpt = False) -> Reporting:
    return Reporting(top, as_json, quiet)


DistTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--dist-timeout",
        help="Under torchrun (or another launcher): seconds to wait for the other processes before stopping with "
        "an error: to join the group, and at each exchange, where the fastest process waits for the slowest to "
        "finish its share and the others for rank 0 to write the output.",
        rich_help_panel="Distributed",
        metavar="SECONDS",
    ),
]


def _world(dist_timeout: DistTimeoutOpt = DEFAULT_TIMEOUT) -> Any:
    from lowrank_audit.distributed import current

    return current()  # joined by _join before the groups are evaluated


RevisionOpt = Annotated[
    str | None,
    typer.Option(
        help="With a model named by its Hugging Face id (org/name) instead of a path: the branch, tag or commit "
        "to read from the local cache (default main). Nothing is ever downloaded.",
        metavar="REV",
    ),
]
# Parameters naming a checkpoint, which may be a hub id; commands taking a --base get --revision.
CHECKPOINT_PARAMETERS = ("checkpoint", "source", "base")


# Option groups a command takes whole: the parameter it declares, and the function whose own
# parameters become the command's options and whose result the command receives.
# ``world`` is joined before the others are evaluated (_join), on the device the command computes on.
GROUPS: dict[str, Callable[..., Any]] = {"engine": _engine, "rank_policy": _ranks, "reporting": _reporting,
                                         "world": _world}  # fmt: skip


def grouped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command every option of the groups it names as parameters (``engine``,
    ``rank_policy``, ``reporting``, ``world``), so each group is declared here once and reaches
    the command as one value: ``engine`` the library's engine keyword arguments, ``rank_policy``
    a validated :class:`~lowrank_audit.ranks.RankPolicy`, ``reporting`` a :class:`Reporting`,
    ``world`` the joined :class:`~lowrank_audit.distributed.World` (``--dist-timeout``; naming
    it is what makes a command shard under torchrun).

    A command that takes ``--base`` audits checkpoints, and gets ``--revision``: its checkpoint
    (and base) may be a Hugging Face model id, resolved offline from the local cache
    (:func:`lowrank_audit.io.hub.local`; ``--revision`` applies to the checkpoint, a base id
    is read at ``main``).

    A group's validation error (conflicting rank options) is an ordinary one-line error.
    """
    from lowrank_audit.cli.app import user_errors

    own = inspect.signature(fn)
    groups = [name for name in own.parameters if name in GROUPS]
    members = {name: list(inspect.signature(GROUPS[name], eval_str=True).parameters.values()) for name in groups}
    # The command's own annotations are strings (postponed evaluation); the group parameters'
    # types may be imported for type checking only, so only the others are evaluated.
    params = [
        p.replace(annotation=eval(p.annotation, fn.__globals__) if isinstance(p.annotation, str) else p.annotation)
        for p in own.parameters.values()
        if p.name not in GROUPS
    ]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name in groups for p in members[name]]
    hub = "base" in own.parameters  # a command that audits checkpoints (spectrum, recommend, compress, check)
    if hub:
        params.append(
            inspect.Parameter("revision", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RevisionOpt)
        )

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        with user_errors():
            _join(fn.__name__, kwargs, sharded="world" in groups)  # first, so every later failure is exchanged
            for name in groups:
                kwargs[name] = GROUPS[name](**{p.name: kwargs.pop(p.name) for p in members[name]})
            if hub:  # models named by hub id become their cached snapshot folders, before anything runs
                from lowrank_audit.errors import OptionError
                from lowrank_audit.io.hub import local

                revision = kwargs.pop("revision")
                for name in CHECKPOINT_PARAMETERS:
                    if kwargs.get(name) is None:
                        continue
                    if str(kwargs[name]).endswith(".parquet"):  # a report: nothing to resolve
                        if revision is not None and name != "base":
                            raise OptionError(f"--revision applies to a checkpoint; {kwargs[name]} is a report")
                        continue
                    kwargs[name] = local(kwargs[name], revision if name != "base" else None)
            return fn(**kwargs)

    command.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _join(name: str, kwargs: dict[str, Any], *, sharded: bool) -> None:
    """Join the launcher's process group for a command that shards; refuse one that does not
    when a launcher started several processes (each would write the same outputs). Off rank 0
    nothing is printed, from the start: rank 0 reports for every process."""
    from lowrank_audit import distributed
    from lowrank_audit.cli.render import err_console, out_console
    from lowrank_audit.errors import OptionError

    if distributed.silent_here():
        out_console.quiet = err_console.quiet = True
    if not sharded:
        if distributed.launched():
            refused = OptionError(f"{name} runs in one process; start it without torchrun or another launcher")
            raise distributed.alike(refused)
        return
    distributed.join(str(kwargs.get("device") or "cpu"), kwargs["dist_timeout"])
