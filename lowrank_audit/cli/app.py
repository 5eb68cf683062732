"""The ``lowrank-audit`` application: the Typer app, ``--version``, and the one error mapper.

Each command lives in its own module and registers itself on :data:`app`; heavy modules
(torch, pandas) are imported inside commands so ``--help`` stays instant.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Annotated

import click
import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from lowrank_audit import distributed
from lowrank_audit._version import __version__
from lowrank_audit.cli.render import err_console, out_console
from lowrank_audit.errors import LowrankAuditError, describe


class _NoFlagMetavar:
    """``--help`` is a flag: show it without the ``<bool>`` placeholder Typer gives flags."""

    def get_help_option(self, ctx: typer.Context) -> typer.core.TyperOption | None:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Command(_NoFlagMetavar, TyperCommand):
    """Usage lines read ``lowrank-audit spectrum [OPTIONS] CHECKPOINT``, as in every Unix manual:
    the metavar alone, not Typer's ``{CHECKPOINT}`` and ``<path>`` decorations."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p.replace("{", "").replace("}", "") for p in pieces]

    def format_help(self, ctx: typer.Context, formatter: typer.core.click.HelpFormatter) -> None:
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
        super().format_help(ctx, formatter)


class Group(_NoFlagMetavar, TyperGroup):
    pass


app = typer.Typer(
    name="lowrank-audit",
    cls=Group,
    help="Spectral audits of neural-network checkpoints: singular values of every weight matrix or fine-tuning update, LoRA ranks, low-rank compression and a CI gate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Colour and cursor codes: a message quoting a library (torch's pickle refusals) may hold them;
# they go. Other control characters (a tensor or global name from a hostile file: a terminal
# title, a character-set switch, a newline) are shown escaped, so the message stays one line.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Exit codes: 2 bad input or a failed read or write (LowrankAuditError), 130 Ctrl-C (128 + SIGINT),
# 141 the reader of stdout went away (128 + SIGPIPE, as a shell reports `cmd | head`), 70 a bug
# in this tool (EX_SOFTWARE), so that `check`'s 1 only ever means "a rule failed".
INTERRUPTED, CLOSED_PIPE, INTERNAL = 130, 141, 70


def _debug_env() -> bool:
    return os.environ.get("LOWRANK_AUDIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


debug = _debug_env()


def _plain(text: str) -> str:
    """One line of plain text, safe to print: no colour codes, control characters escaped, and
    rich markup escaped (tensor names and TOML keys hold brackets)."""
    return escape(_CONTROL.sub(lambda m: repr(m[0])[1:-1], _ANSI.sub("", text)))


def _error(text: str) -> None:
    err_console.print(f"[red]Error:[/] {_plain(text)}", highlight=False, soft_wrap=True)


@contextmanager
def _noting_interrupts() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as usual, and is also noted: a library that catches it
    mid-call and raises something else instead (torch and safetensors can, inside a read) must
    not turn an interrupt into a read error."""
    noted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def interrupt(signum: int, frame: object) -> None:
        noted.set()
        raise KeyboardInterrupt

    # Under a launcher SIGTERM too: torchrun stops the other processes with it when one
    # fails, and unfinished outputs must go then as well.
    signals = (signal.SIGINT, signal.SIGTERM) if distributed.launched() else (signal.SIGINT,)
    previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def user_errors() -> Iterator[None]:
    """The one error path: each failure becomes one ``Error:`` line and its exit code.

    Project errors and OS errors exit 2, Ctrl-C 130 (whatever exception it surfaced as), a
    closed stdout 141 (silently), anything else is a bug in this tool: its traceback, then
    exit 70. ``--debug`` (or ``LOWRANK_AUDIT_DEBUG=1``) prints the traceback of every error.
    """
    failure: BaseException | None = None
    try:
        with _noting_interrupts() as interrupted:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    yield
                for w in caught:
                    err_console.print(f"[yellow]Warning:[/] {_plain(str(w.message))}", highlight=False, soft_wrap=True)
            except (typer.Exit, click.exceptions.Exit, click.ClickException, click.Abort):
                raise
            except BaseException as err:  # noqa: BLE001 - every failure ends here, as one line
                if debug and not isinstance(err, KeyboardInterrupt) and not distributed.traced(err):
                    traceback.print_exc()
                    distributed.mark_traced(err)
                failure, code = _fail(err, interrupted.is_set())
    finally:
        # After the signal handlers are restored: leave() ignores SIGTERM itself while it waits
        # for rank 0's line under torchrun.
        distributed.leave(failure)
    if failure is not None:
        raise typer.Exit(code) from None


def _fail(err: BaseException, interrupted: bool) -> tuple[BaseException, int]:
    """Report a failure and return it with its exit code. Under a launcher the other
    processes learn of it first (:func:`lowrank_audit.distributed.conclude`), so that rank 0
    prints the one line for all; a failure they cannot be told of is printed where it happened."""
    if distributed.launched() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exiting anyway: a stop must not cut the exchange
    err = distributed.conclude(err)
    untold = not (distributed.told(err) or distributed.is_alike(err) or isinstance(err, KeyboardInterrupt))
    if distributed.silent_here() and untold:
        err_console.quiet = False  # rank 0 does not know of it: say it here
        known = describe(err)
        if known is not None and not isinstance(err, distributed.GroupError):  # which names its process
            rank, size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
            err = LowrankAuditError(f"process {rank} of {size}: {known[0]}")
            err.exit_code = known[1]
    return err, _report(err, interrupted)


def _report(err: BaseException, interrupted: bool) -> int:
    """Print the one line for ``err`` and return the exit code."""
    if interrupted or isinstance(err, KeyboardInterrupt):
        _error("interrupted; unfinished outputs were removed")
        return INTERRUPTED
    if isinstance(err, BrokenPipeError):
        # Nothing to say (stdout is gone, and `| head` is not a failure); stdout goes to
        # /dev/null so the interpreter's final flush does not complain either.
        with suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_PIPE
    known = describe(err)
    if known is not None:
        _error(known[0])
        return known[1]
    if not isinstance(err, Exception):  # SystemExit and the like pass through as they are
        raise err
    if not distributed.traced(err):  # printed where it happened, or by --debug
        traceback.print_exception(err)
    _error(f"internal error ({type(err).__name__}); this is a bug in lowrank-audit, please report it")
    return INTERNAL


def command() -> typer.models.CommandFunctionType:
    """Register a command on :data:`app`, with the option groups it names
    (:func:`lowrank_audit.cli.options.grouped`); every command goes through here."""
    from lowrank_audit.cli.options import grouped

    def register(fn: typer.models.CommandFunctionType) -> typer.models.CommandFunctionType:
        app.command(cls=Command)(grouped(fn))
        return fn

    return register


def command_line() -> str:
    """The command line as typed, recorded in reports' provenance."""
    return shlex.join(["lowrank-audit", *sys.argv[1:]])


def _version_callback(value: bool) -> None:
    if value:
        out_console.print(f"lowrank-audit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version and exit.", metavar=""
        ),
    ] = False,
    show_traceback: Annotated[
        bool,
        typer.Option("--debug", help="Print the traceback of every error (also LOWRANK_AUDIT_DEBUG=1).", metavar=""),
    ] = False,
) -> None:
    """Spectral audits of neural-network checkpoints."""
    global debug
    debug = show_traceback or _debug_env()
