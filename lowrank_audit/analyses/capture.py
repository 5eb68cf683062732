"""Capture the inputs of a model's ``nn.Linear`` layers: their moments, or the raw rows.

Forward pre-hooks on the selected Linear modules see each input ``[..., d]`` as rows
``[N, d]`` while the model runs under ``torch.inference_mode()`` and in eval mode (dropout
off; every submodule's training flag is restored afterwards). The rows go into
:class:`~lowrank_audit.io.activations.Moments` (XᵀX, row sum, rows) or, with ``raw``, are
kept as they are, at most ``max_rows`` per module: the first rows in batch order are kept and
the later ones only counted (a warning says how many were seen).

Precision: each forward's rows are upcast to float64 once and added as one rank-k update
(``addmm_`` into the float64 accumulator), on the device the activations are on (CUDA when
the model runs there). The moments are exact to float64 rounding, and the same as
accumulating the raw rows with :func:`~lowrank_audit.io.activations.read_activations`.

Shared inputs: Linear layers called one after another on the same tensor (q/k/v on the
normalized hidden states, gate/up in a gated MLP) are accumulated once. "The same tensor"
means the same data pointer, shape, strides, dtype and device; the first tensor is held
until the run of calls ends, so its memory cannot be reused meanwhile, and a tensor is
assumed not to be modified in place between two Linear layers that read it. Modules that
shared every input share one accumulator; should a later batch feed them different
tensors, the accumulator is split then, so every module's moments are its own. The file
still holds every module under its own name (the shared moments written once for each).

The command's inputs, ``--model MODULE:CALLABLE`` and the batch file, are read by
:mod:`lowrank_audit.io.model_inputs`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_audit.distributed import World, block, current
from lowrank_audit.errors import CheckpointError, LowrankAuditError, NoMatricesSelected, OptionError
from lowrank_audit.io.activations import Moments, write_dumps, write_moments
from lowrank_audit.io.model_inputs import DEFAULT_BATCH_SIZE, load_model, one_line, open_batches
from lowrank_audit.io.outputs import check_target
from lowrank_audit.io.selection import wanted

# Raw rows are held in host memory until written: 4096 rows of a 4096-wide float32 input
# are 64 MiB per module.
DEFAULT_MAX_ROWS = 4096

BatchProgress = Callable[[int, "int | None"], None]  # (batches done, batches in all or None)


@dataclass(frozen=True)
class Capture:
    """What :func:`capture` recorded.

    Attributes:
        moments: Module path -> its input's moments on the CPU (empty with ``raw``).
        rows: With ``raw``: module path -> the first rows of its input, of shape (kept, d),
            in the input's dtype, on the CPU; else empty.
        seen: Module path -> input rows seen in all (kept or not, finite or not).
        groups: Moments only: modules that shared one accumulator (two or more each), sorted.
        batches: Forward passes run.
    """

    moments: dict[str, Moments]
    rows: dict[str, torch.Tensor]
    seen: dict[str, int]
    groups: tuple[tuple[str, ...], ...]
    batches: int


class _Shared:
    """One accumulator and the modules whose inputs it holds (identity-hashed)."""

    def __init__(self, moments: Moments, members: set[str]) -> None:
        self.moments, self.members = moments, members


@dataclass
class _Run:
    """Consecutive Linear calls on one tensor within a forward pass."""

    key: tuple[Any, ...]
    # Held until the run ends, so its memory cannot be taken by another tensor meanwhile.
    tensor: torch.Tensor
    members: list[str]
    # The rows as the first module saw them, copied when it was called (float64 on the device
    # for moments, at most max_rows on the CPU for raw rows), so that the model may change
    # the tensor in place once the run is over.
    rows: torch.Tensor | None

    def matches(self, x: torch.Tensor) -> bool:
        return _key(x) == self.key


def _key(x: torch.Tensor) -> tuple[Any, ...]:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)


class _Recorder:
    """The forward pre-hooks' state: the current run, the accumulators or kept rows."""

    def __init__(self, raw: bool, max_rows: int) -> None:
        self.raw, self.max_rows = raw, max_rows
        self.group_of: dict[str, _Shared] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.seen: dict[str, int] = {}
        self.run: _Run | None = None

    def hook(self, name: str, width: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            # Anything else makes Linear.forward itself fail, with its own message.
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim and x.shape[-1] == width:
                self.record(name, x)

        return pre_hook

    def record(self, name: str, x: torch.Tensor) -> None:
        run = self.run
        if run is not None and name not in run.members and run.matches(x):
            run.members.append(name)
            return
        self.flush()
        self.run = _Run(_key(x), x, [name], self._copy(x, self._room(name)))

    def _room(self, name: str) -> int:
        return self.max_rows - sum(len(r) for r in self.kept.get(name, ()))

    def _copy(self, x: torch.Tensor, room: int) -> torch.Tensor | None:
        rows = x.reshape(-1, x.shape[-1])  # (k, d)
        if not self.raw:
            return rows.to(torch.float64, copy=True)  # the upcast Moments.add would make anyway
        return rows[: self.max_rows].to("cpu", copy=True) if room > 0 else None

    def flush(self) -> None:
        """Add the current run to its modules; called before a new run and after each forward."""
        run, self.run = self.run, None
        if run is None:
            return
        count = run.tensor.numel() // run.tensor.shape[-1]
        for name in run.members:
            self.seen[name] = self.seen.get(name, 0) + count
        if self.raw:
            self._keep(run)
            return
        assert run.rows is not None
        shared = self.group_of.get(run.members[0])
        if shared is not None and shared.members == set(run.members):
            shared.moments.add(run.rows)  # the usual case: the same modules as before, one addmm_
            return
        chunk = Moments(run.members[0], *_zeros(run.rows.shape[1], run.rows.device), 0)
        chunk.add(run.rows)
        self._commit(run.members, chunk)

    def _keep(self, run: _Run) -> None:
        room = {name: self._room(name) for name in run.members}
        if max(room.values()) <= 0:
            return
        # A module joining a run whose first module was full: copy now (rare).
        rows = run.rows if run.rows is not None else self._copy(run.tensor, 1)
        for name, free in room.items():
            if free > 0:
                self.kept.setdefault(name, []).append(rows[:free])

    def _commit(self, members: list[str], chunk: Moments) -> None:
        """Add ``chunk`` to exactly ``members``: split off any accumulator also holding modules
        that saw another tensor this time, and give new modules one accumulator."""
        touched: dict[_Shared, list[str]] = {}
        fresh = []
        for name in members:
            if name in self.group_of:
                touched.setdefault(self.group_of[name], []).append(name)
            else:
                fresh.append(name)
        for shared, names in touched.items():
            if len(names) < len(shared.members):
                shared.members -= set(names)
                shared = _Shared(_clone(shared.moments), set(names))
                self.group_of.update(dict.fromkeys(names, shared))
            shared.moments.merge(chunk)
        if fresh:  # chunk itself becomes their accumulator (merged above, not changed)
            self.group_of.update(dict.fromkeys(fresh, _Shared(chunk, set(fresh))))

    def result(self, batches: int) -> Capture:
        names = sorted(self.seen)
        if self.raw:
            rows = {n: torch.cat(self.kept[n]) for n in names if n in self.kept}
            return Capture({}, rows, {n: self.seen[n] for n in names}, (), batches)
        on_host: dict[_Shared, Moments] = {}
        moments = {}
        for name in names:
            shared = self.group_of[name]
            if shared in on_host:  # each module its own tensors: safetensors refuses shared memory
                host = _clone(on_host[shared])
            else:
                host = on_host[shared] = _to_cpu(shared.moments)
            moments[name] = Moments(name, host.xtx, host.total, host.count, host.nonfinite)
        groups = sorted({tuple(sorted(s.members)) for s in self.group_of.values() if len(s.members) > 1})
        return Capture(moments, {}, {n: self.seen[n] for n in names}, tuple(groups), batches)


def _zeros(width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(width, width, dtype=torch.float64, device=device),
            torch.zeros(width, dtype=torch.float64, device=device))  # fmt: skip


def _clone(m: Moments) -> Moments:
    return Moments(m.module, m.xtx.clone(), m.total.clone(), m.count, m.nonfinite)


def _to_cpu(m: Moments) -> Moments:
    return Moments(m.module, m.xtx.cpu(), m.total.cpu(), m.count, m.nonfinite)


def select_linear(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules (subclasses too) whose paths pass the globs, by path.

    Raises:
        NoMatricesSelected: None is left; the message says how many Linear modules there are.
    """
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {name: m for name, m in linear.items() if wanted(name, include, exclude)}
    if not chosen:
        example = ", ".join(sorted(linear)[:3]) or "none"
        raise NoMatricesSelected(f"no nn.Linear module matches --include/--exclude; the model has "
                                 f"{len(linear)} (e.g. {example})")  # fmt: skip
    return chosen


def _device_of(model: nn.Module) -> torch.device | None:
    first = next(model.parameters(), None)
    return None if first is None else first.device


def _forward(model: nn.Module, batch: Any, device: torch.device | None) -> None:
    def move(t: Any) -> Any:
        return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) and device is not None else t

    if isinstance(batch, Mapping):
        model(**{k: move(v) for k, v in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*(move(v) for v in batch))
    else:
        model(move(batch))


def _warn(result: Capture, selected: Iterable[str], max_rows: int) -> None:
    idle = sorted(set(selected) - set(result.seen))
    if idle:
        warnings.warn(f"{len(idle)} selected Linear modules never ran and are left out: {', '.join(idle[:5])}"
                      + (" ..." if len(idle) > 5 else ""), stacklevel=3)  # fmt: skip
    over = {n: s for n, s in result.seen.items() if result.rows and s > max_rows}
    if over:
        most = max(over.values())
        warnings.warn(f"raw rows capped at --max-rows {max_rows}: {len(over)} modules saw more (up to {most:,}); "
                      "the first rows in batch order are kept", stacklevel=3)  # fmt: skip
    bad = {n: m.nonfinite for n, m in result.moments.items() if m.nonfinite}
    if bad:
        warnings.warn(f"{len(bad)} modules had rows with NaN or Inf, left out of their moments "
                      f"(e.g. {next(iter(bad))}: {next(iter(bad.values())):,} rows)", stacklevel=3)  # fmt: skip


def capture(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    raw: bool = False,
    max_rows: int = DEFAULT_MAX_ROWS,
    progress: BatchProgress | None = None,
) -> Capture:
    """Run ``model`` over ``batches`` and record the inputs of its selected Linear layers.

    Args:
        model: Any module; its ``nn.Linear`` submodules (and subclasses) are hooked.
        batches: Each a mapping passed as ``model(**batch)``, a tuple as ``model(*batch)``, or
            one tensor as ``model(batch)``; tensors are moved to the device of the model's
            first parameter. A sized iterable gives the progress callback its total.
        include: Globs on module paths (``*.q_proj``); when given, only matching modules.
        exclude: Globs on module paths to leave out.
        raw: Keep the rows themselves (``Capture.rows``) instead of their moments.
        max_rows: With ``raw``, the most rows kept per module; later rows are counted only.
        progress: Called after each batch with (batches done, total or None).

    Returns:
        A :class:`Capture`. Modules whose hook never ran are left out, with a warning.

    Raises:
        NoMatricesSelected: No Linear module passes the globs.
        OptionError: ``max_rows`` is below 1.
        Exception: Whatever the model's forward pass raises, unchanged.

    Example:
        >>> result = capture(model, [{"input_ids": ids}], include=["*.mlp.*"])
        >>> result.moments["model.layers.0.mlp.down_proj"].gram().shape
    """
    result, selected = _record(model, batches, include=include, exclude=exclude, raw=raw, max_rows=max_rows,
                               progress=progress)  # fmt: skip
    _warn(result, selected, max_rows)
    return result


def _record(
    model: nn.Module, batches: Iterable[Any], *, include: Sequence[str], exclude: Sequence[str], raw: bool,
    max_rows: int, progress: BatchProgress | None,
) -> tuple[Capture, list[str]]:  # fmt: skip
    """:func:`capture` without its warnings: the result, and the modules selected."""
    if max_rows < 1:
        raise OptionError(f"max-rows must be a positive integer but got {max_rows}")
    selected = select_linear(model, include, exclude)
    recorder = _Recorder(raw, max_rows)
    handles = [m.register_forward_pre_hook(recorder.hook(n, m.in_features), with_kwargs=True)
               for n, m in selected.items()]  # fmt: skip
    modes = {m: m.training for m in model.modules()}
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    done, device = 0, _device_of(model)
    try:
        model.eval()
        with torch.inference_mode():
            for batch in batches:
                _forward(model, batch, device)
                recorder.flush()
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
        recorder.run = None
    return recorder.result(done), list(selected)


_HOOK_CODE = ("pre_hook", "record", "_room", "_copy", "flush", "_keep", "_commit")


def _in_our_hook(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside the recorder (our bug) rather than by the model."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename == __file__ and code.co_name in _HOOK_CODE:
            return True
        tb = tb.tb_next
    return False


def capture_to_file(
    model: str,
    inputs: str | Path,
    out: str | Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    raw: bool = False,
    max_rows: int = DEFAULT_MAX_ROWS,
    device: str = "auto",
    force: bool = False,
    progress: BatchProgress | None = None,
) -> Capture:
    """What ``lowrank-audit capture`` does: build the model from ``model`` (``MODULE:CALLABLE``,
    see :func:`load_model`), run it on the batches of ``inputs`` (:func:`open_batches`) on
    ``device``, and write the moments (or, with ``raw``, the rows) to ``out``.

    Returns:
        The :class:`Capture` that was written.

    Raises:
        OptionError: A bad ``--model``, ``out`` exists without ``force`` or is the input, or the
            model's forward pass fails on a batch (named, with the error).
        CheckpointError: ``inputs`` is missing, unreadable or has unequal first dimensions.
        NoMatricesSelected: No Linear module passes the globs.
    """
    from lowrank_audit.engine.config import resolve_device

    out = check_target(out, [inputs], force=force)
    every = open_batches(inputs, batch_size=batch_size)
    if len(every) == 0:
        raise CheckpointError(f"{inputs}: holds no rows (first dimension 0): nothing to run the model on")
    world = current()  # under torchrun: each process runs a block of the batches, the sums go to rank 0
    batches = every.part(block(len(every), world))
    dev = resolve_device(device)

    def forward_share() -> tuple[Capture, list[str]]:
        module = load_model(model).to(dev)
        try:
            return _record(module, batches, include=include, exclude=exclude, raw=raw, max_rows=max_rows,
                           progress=progress)  # fmt: skip
        except LowrankAuditError:
            raise
        except Exception as exc:
            if _in_our_hook(exc):
                raise
            raise OptionError(f"--model {model}: the forward pass on {inputs} (tensors {', '.join(every.names)}, "
                              f"--batch-size {batch_size}) failed: {one_line(exc)}") from exc  # fmt: skip

    result, selected = world.run(forward_share)
    result = combine(result, world, raw=raw, max_rows=max_rows)
    _warn(result, selected, max_rows)

    def write() -> None:
        if raw:
            write_dumps(result.rows, out, force=force)
        else:
            write_moments(result.moments.values(), out, force=force)

    world.on_main(write)
    return result


@dataclass(frozen=True)
class _Summary:
    """What each process tells the others of its capture before the sums (small)."""

    seen: dict[str, int]
    groups: list[set[str]]
    batches: int
    moments: dict[str, tuple[int, int, int]]  # module -> (width, rows added, rows left out: NaN/Inf)


def combine(result: Capture, world: World, *, raw: bool = False, max_rows: int = DEFAULT_MAX_ROWS) -> Capture:
    """Every process's capture (each of its own batches, in rank order) as one, on rank 0.

    Moments are summed in float64 (a reduction over the processes: equal to one process's
    sums within float64 rounding); with ``raw`` the rows are concatenated in rank order and
    cut at ``max_rows`` (the ranks hold consecutive blocks of batches, so this is batch
    order, and each process sends only the rows that fall within it); modules share an
    accumulator only where they shared one on every process where they ran. The other
    processes get their own capture back, unchanged. Alone, ``result`` is returned as it is.
    """
    if world.size == 1:
        return result
    mine = _Summary(result.seen, [set(g) for g in result.groups], result.batches,
                    {n: (m.width, m.count, m.nonfinite) for n, m in result.moments.items()})  # fmt: skip
    summaries = world.gather(lambda: mine)
    names = sorted({n for s in summaries for n in s.seen})
    seen = {n: sum(s.seen.get(n, 0) for s in summaries) for n in names}
    batches = sum(s.batches for s in summaries)
    if raw:
        # Each process sends only the rows still within max_rows after the rows of the processes
        # before it (their batches come first), so rank 0 receives at most max_rows per module.
        before = {n: sum(s.seen.get(n, 0) for s in summaries[: world.rank]) for n in names}
        kept = {n: r[: max(0, max_rows - before[n])] for n, r in result.rows.items()}
        parts = world.gather(lambda: {n: r for n, r in kept.items() if len(r)}, everywhere=False)
        rows = world.on_main(lambda: {n: torch.cat([p[n] for p in parts if n in p]) for n in names
                                      if any(n in p for p in parts)}, share=False)  # fmt: skip
        return Capture({}, rows, seen, (), batches) if world.main else result
    moments = {}
    for n in names:
        held = [s.moments[n] for s in summaries if n in s.moments]  # (width, count, nonfinite) where it ran
        own = result.moments.get(n) or Moments.empty(n, held[0][0])
        # Off rank 0, gloo's reduce may leave partial sums in the buffers: reduce copies there.
        sums = [own.xtx, own.total] if world.main else [own.xtx.clone(), own.total.clone()]
        world.reduce(sums)
        moments[n] = Moments(n, sums[0], sums[1], sum(h[1] for h in held), sum(h[2] for h in held))

    def group_on(s: _Summary, name: str) -> Any:
        """The module's accumulator on a process: None where it never ran (no say in grouping)."""
        if name not in s.seen:
            return None
        return next((i for i, g in enumerate(s.groups) if name in g), ("alone", name))

    by_key: dict[tuple[Any, ...], list[str]] = {}
    for n in names:
        by_key.setdefault(tuple(group_on(s, n) for s in summaries), []).append(n)
    groups = tuple(sorted(tuple(g) for g in by_key.values() if len(g) > 1))
    return Capture(moments, {}, seen, groups, batches) if world.main else result


__all__ = ["DEFAULT_MAX_ROWS", "Capture", "capture", "capture_to_file", "combine", "select_linear"]
