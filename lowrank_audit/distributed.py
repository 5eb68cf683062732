"""Many processes, one audit: the commands under ``torchrun`` (``srun torchrun``, or ``accelerate launch``).

A launcher starts the same command in every process and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
The CLI joins that process group (:func:`join`) before a command that shards; a library
caller calls :func:`join` itself (it adopts a group the caller initialized). The analyses
shard over the joined group (:func:`current`); without one nothing here runs and nothing
changes.

Every process builds the same plan from the inputs' headers, takes its cost-balanced share
(:meth:`World.share`), reads and decomposes only that, and the results are gathered
(:meth:`World.gather`: to every process; factors to rank 0 alone). Rank 0 alone writes
outputs (:meth:`World.on_main`). A failure on
any process is data in the exchange: every process learns it at the same point, rank 0
reports it, and every process exits with its code. A failure met outside any exchange
(planning, an option, an output that exists) is told to the others at their next one
(:func:`conclude`). A peer that dies or hangs is noticed when an exchange fails or times
out (``--dist-timeout``), never waited on forever.

Results travel pickled over gloo (they are on the CPU): the group itself on CPUs; with GPUs
the group is NCCL and a gloo group over the same processes carries them.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from lowrank_audit.errors import LowrankAuditError, OptionError, describe

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
# Long enough for rank 0 to write and verify a large output while the others wait for its
# verdict; a launcher (torchrun) stops the others at once when a process dies.
DEFAULT_TIMEOUT = 1800.0
MAX_TIMEOUT = 1e7  # about 116 days; torch's timers overflow far above it


class PeerFailure(LowrankAuditError):
    """Another process failed (or this one, seen through the exchange): its message and exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GroupError(LowrankAuditError):
    """The process group cannot be joined, or an exchange with it failed (a peer died or timed out)."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run: rank ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1
    backend: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    group: Any = field(default=None, compare=False, repr=False)  # the gloo group results travel on (None: default)

    @property
    def main(self) -> bool:
        """Whether this process is rank 0, the one that writes outputs and prints."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What a report's provenance records: ``world_size`` and ``backend``."""
        return {"world_size": self.size, "backend": self.backend}

    def share(self, items: Sequence[T], cost: Callable[[T], float]) -> list[T]:
        """This process's items of a cost-balanced split (:func:`split`), in their given order."""
        return split(items, cost, self.size)[self.rank] if self.size > 1 else list(items)

    def run(self, work: Callable[[], T]) -> T:
        """Run ``work`` on every process and return this process's result; a failure anywhere
        is raised on every process (:meth:`_settle`)."""
        if self.size == 1:
            return work()
        value, failed = _attempt(work)
        self._raise(self._settle(failed))
        return value  # type: ignore[return-value]

    def gather(self, work: Callable[[], T], *, everywhere: bool = True) -> list[T]:
        """Run ``work`` on every process; each process's result, by rank.

        With ``everywhere`` every process gets every result; without, rank 0 does and the
        others an empty list (factors, which only rank 0 writes). A failure anywhere is
        raised on every process (:meth:`_settle`).
        """
        if self.size == 1:
            return [work()]
        # Pickled inside the attempt, so that nothing but the transport can fail between the
        # status exchange and the data's (a failure there would meet the wrong collective).
        payload = self.run(lambda: _pickled(work()))
        dist = _dist()
        with self._transport():
            if everywhere:
                out: list[Any] = [None] * self.size
                dist.all_gather_object(out, payload, group=self.group)
                return [pickle.loads(p) for p in out]
            if not self.main:
                dist.send_object_list([payload], dst=0, group=self.group)
                return []
            # One process's results at a time: rank 0 never holds every process's pickle at once.
            # Every sender is received even after a failure here, so that none is left waiting.
            got: list[Any] = []
            failed: BaseException | None = None
            for rank in range(self.size):
                box: list[Any] = [payload]
                payload = None
                if rank:
                    dist.recv_object_list(box, src=rank, group=self.group)
                if failed is None:
                    try:
                        got.append(pickle.loads(box[0]))
                    except Exception as exc:  # noqa: BLE001 - out of memory, say: told at the next exchange
                        _trace(exc)
                        failed = exc
                box.clear()
        if failed is not None:
            raise failed
        return got

    def on_main(self, work: Callable[[], T], *, share: bool = True) -> T | None:
        """Run ``work`` on rank 0 only (writing an output); every process gets its result (only
        rank 0 without ``share``; the others None), or raises its failure."""
        if self.size == 1:
            return work()
        self._raise(self._settle(None))  # first: a process that failed on its own is heard before rank 0 writes
        value: Any = None
        failed: BaseException | None = None
        if self.main:  # the result pickled inside the attempt too, as in gather
            value, failed = _attempt(lambda: (v := work(), _pickled(v) if share else None))
        box: list[Any] = [None if failed is None else describe_failure(failed), value[1] if value else None]
        with self._transport():
            _dist().broadcast_object_list(box, src=0, group=self.group)
        if failed is not None:
            raise _exchanged(failed)
        if box[0] is not None:
            raise PeerFailure(*box[0])
        if self.main:
            return value[0]
        return pickle.loads(box[1]) if box[1] is not None else None

    def reduce(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum CPU tensors over all processes into rank 0's, in place, in the order given."""
        if self.size == 1:
            return
        self._raise(self._settle(None))  # a process that failed on its own is heard here, not in a reduce
        dist = _dist()
        with self._transport():
            for t in tensors:
                dist.reduce(t, dst=0, op=dist.ReduceOp.SUM, group=self.group)

    def _settle(self, failed: BaseException | None) -> BaseException | None:
        """Every process says whether it failed; the first failure by rank, which every process
        then raises (as itself on its own process, as a :class:`PeerFailure` on the others), or None."""
        said: list[Any] = [None] * self.size
        with self._transport():
            _dist().all_gather_object(said, None if failed is None else describe_failure(failed), group=self.group)
        first = next((rank for rank, s in enumerate(said) if s is not None), None)
        if first is None:
            return None
        if first == self.rank:
            return _exchanged(failed)  # type: ignore[arg-type]
        message, code = said[first]
        return PeerFailure(f"{message} (on process {first} of {self.size})", code)

    @staticmethod
    def _raise(failure: BaseException | None) -> None:
        if failure is not None:
            raise failure

    @contextmanager
    def _transport(self) -> Iterator[None]:
        """A collective that fails (a peer stopped, or gave no answer in time) is a lost group."""
        try:
            yield
        except RuntimeError as exc:
            raise GroupError(
                f"process {self.rank} of {self.size} lost the other processes (one stopped, or gave no answer "
                f"within --dist-timeout {self.timeout:g} s): {_cause(exc)}"
            ) from None


def split(items: Sequence[T], cost: Callable[[T], float], parts: int) -> list[list[T]]:
    """Deterministic cost-balanced parts: largest first, each to the least-loaded part
    (ties to the lower part), then each part in the items' own order."""
    order = sorted(range(len(items)), key=lambda i: (-cost(items[i]), i))
    loads = [0.0] * parts
    chosen: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        part = min(range(parts), key=lambda p: (loads[p], p))
        chosen[part].append(i)
        loads[part] += cost(items[i])
    return [[items[i] for i in sorted(c)] for c in chosen]


def block(count: int, world: World) -> range:
    """This process's contiguous block of ``count`` items in order (batches, whose rows must
    keep their order when gathered): rank r gets ``[r·count/size, (r+1)·count/size)``."""
    return range(world.rank * count // world.size, (world.rank + 1) * count // world.size)


def told(err: BaseException) -> bool:
    """Whether every process of the group knows of ``err`` (it came through an exchange)."""
    return isinstance(err, PeerFailure) or getattr(err, "lowrank_audit_exchanged", False)


def alike(err: BaseException) -> BaseException:
    """Mark an error that every process meets alike before joining (a bad ``--dist-timeout``,
    a command that refuses a launcher): rank 0's line says it for all."""
    err.lowrank_audit_alike = True  # type: ignore[attr-defined]
    return err


def is_alike(err: BaseException) -> bool:
    return getattr(err, "lowrank_audit_alike", False)


def traced(err: BaseException) -> bool:
    """Whether ``err``'s traceback was printed already (a bug, where it happened)."""
    return getattr(err, "lowrank_audit_traced", False)


def mark_traced(err: BaseException) -> None:
    err.lowrank_audit_traced = True  # type: ignore[attr-defined]


def _trace(err: BaseException) -> None:
    """Print a bug's traceback where it happened, once."""
    if describe(err) is None and not traced(err):
        traceback.print_exception(err)
        mark_traced(err)


def describe_failure(err: BaseException) -> tuple[str, int]:
    """A failure as it travels: its one line and exit code (70 and its type for a bug)."""
    known = describe(err)
    if known is not None:
        return known
    return f"internal error ({type(err).__name__}); this is a bug in lowrank-audit, please report it", 70


def _attempt(work: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    """Run ``work``; a failure is kept to be exchanged (Ctrl-C and exits pass through)."""
    try:
        return work(), None
    except Exception as exc:  # noqa: BLE001 - every failure is sent to the other processes
        _trace(exc)
        return None, exc


def _pickled(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _cause(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _exchanged(err: BaseException) -> BaseException:
    err.lowrank_audit_exchanged = True  # type: ignore[attr-defined]
    return err


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` above 1),
    unless ``LOWRANK_AUDIT_DISTRIBUTED=0`` (a tool run from inside a training job's process,
    which inherits the job's environment, stays alone)."""
    if os.environ.get("LOWRANK_AUDIT_DISTRIBUTED", "").strip() == "0":
        return False
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def silent_here() -> bool:
    """Whether this process leaves printing to rank 0: one of several, and not rank 0."""
    return launched() and os.environ.get("RANK", "0") != "0"


def local_rank() -> int | None:
    """This process's index on its machine (``LOCAL_RANK``), when a launcher started it."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value and value.isdigit() and launched() else None


_world: World | None = None  # the group this process joined through join()
_owned = False  # whether join() initialized it (and leave() destroys it)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def current() -> World:
    """The process group the analyses shard over: the one :func:`join` joined, else this process alone.

    A group is used only once joined: a library call made on some processes of a job (under
    ``if rank == 0:``) must not wait for the others.
    """
    return _world if _world is not None else World()


def join(device: str = "cpu", timeout: float = DEFAULT_TIMEOUT) -> World:
    """Join the process group this process belongs to, or stay alone (no launcher, no group).

    A group the caller initialized (``torch.distributed.init_process_group``) is adopted, and
    a gloo group over the same processes carries the results (on the CPU). Otherwise the
    group a launcher describes in the environment is initialized: NCCL (and a gloo group for
    the results) when this process's ``device`` is a GPU, gloo otherwise; ``auto`` or ``cuda`` is
    the GPU of the local rank. The CLI calls this before each command that shards.

    Raises:
        OptionError: ``timeout`` is not a positive number of seconds up to :data:`MAX_TIMEOUT`.
        GroupError: The group cannot be joined within ``timeout`` seconds.
    """
    global _world, _owned
    if not 0 < timeout <= MAX_TIMEOUT:  # NaN fails too
        raise alike(
            OptionError(f"dist-timeout must be a positive number of seconds up to {MAX_TIMEOUT:.0f} but got {timeout}")
        )
    if _world is not None:
        return _world
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            rank, size = dist.get_rank(), dist.get_world_size()
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
            _world = World(rank, size, str(dist.get_backend()), timeout, group)
        return current()
    if not launched():
        return World()
    from lowrank_audit.engine.config import resolve_device

    rank, size = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        if gpu:
            import torch

            torch.cuda.set_device(dev)
        with _held_stderr():  # torch's C++ log of a failed connection: a stack trace per retry
            dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=timeout))
            # Results are CPU objects: on GPUs they travel on a gloo group over the same processes.
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)) if gpu else None
    except (RuntimeError, ValueError, OSError) as exc:  # torch's store and backend errors
        raise GroupError(
            f"process {rank} of {size} could not join the process group at {where} within --dist-timeout "
            f"{timeout:g} s: {_cause(exc)}"
        ) from None
    _world, _owned = World(rank, size, "nccl" if gpu else "gloo", timeout, group), True
    return _world


@contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold what C++ code writes to file descriptor 2 meanwhile: replayed if the block
    succeeds, dropped if it raises (the error's one line says why)."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        os.write(2, held.read())


def conclude(err: BaseException) -> BaseException:
    """A failure this process met outside any exchange (planning, options, an output that
    exists), told to the others at their next exchange: returns the failure to report, the
    first by rank among those the processes met (itself, marked exchanged, or a
    :class:`PeerFailure`). Alone, or for a lost group, a told failure or an interrupt, ``err``."""
    world = current()
    local = (GroupError, BrokenPipeError)  # a lost group; rank 0's own stdout
    if world.size == 1 or isinstance(err, local) or not isinstance(err, Exception) or told(err):
        return err
    _trace(err)
    try:
        return world._settle(err) or err
    except GroupError:
        return err


def leave(err: BaseException | None) -> None:
    """End this process's part in the group (the CLI calls it last, after any error line).

    After a failure every process learned through an exchange, each waits for the others
    here, so that rank 0 has printed the error before a launcher, seeing the first process
    exit, stops the rest; a stop signal then changes nothing (the exit code stays).
    """
    global _world, _owned
    if err is not None and launched() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exiting with its code: a launcher's stop changes nothing
    if _world is None:
        return
    dist = _dist()
    if err is not None and told(err):
        with suppress(RuntimeError):  # a peer that is gone has nothing left to wait for
            dist.barrier(group=_world.group)
    if _owned:
        with suppress(RuntimeError):
            dist.destroy_process_group()
    _world, _owned = None, False


__all__ = ["DEFAULT_TIMEOUT", "MAX_TIMEOUT", "GroupError", "PeerFailure", "World", "alike", "block", "conclude",
           "current", "describe_failure", "is_alike", "join", "launched", "leave", "local_rank", "mark_traced",
           "silent_here", "split", "told", "traced"]  # fmt: skip
