"""``spectrum``: checkpoint -> selection -> matrix source -> engine -> metrics -> report frame."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lowrank_audit.analyses.alignment import alignment as alignment_of
from lowrank_audit.bounds import tail_metrics
from lowrank_audit.distributed import current
from lowrank_audit.engine.batches import ProgressCallback
from lowrank_audit.engine.config import DEFAULT_MAX_BATCH_MB, DEFAULT_METHOD, EngineConfig
from lowrank_audit.engine.decompose import MatrixResult, spectra
from lowrank_audit.engine.needs import REPORT_NEED, Need
from lowrank_audit.engine.sources import AdapterSource, CheckpointSource, MatrixSource
from lowrank_audit.errors import OptionError, ShapeMismatchError, UnpairedTensorsWarning
from lowrank_audit.io.adapters import adapter_specs, base_tensor, detect, open_adapter
from lowrank_audit.io.checkpoint import Checkpoint, open_checkpoint
from lowrank_audit.io.provenance import hashing_inputs, merge_inputs, provenance
from lowrank_audit.io.selection import Selection, matrix_view, select_matrices
from lowrank_audit.metrics import matrix_metrics

if TYPE_CHECKING:
    import pandas as pd

# A report before it is a frame: row dicts keyed by report column, and the provenance. The
# CLI renders these as they are, so pandas and pyarrow load only to write or read a report.
ReportRows = tuple[list[dict[str, Any]], dict[str, Any]]


def report_row(result: MatrixResult, eps: float, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """One report row: the matrix's identity, the metrics of its singular values, and what its
    source measured (``extras``: an adapter's factor balance)."""
    spec, s = result.spec, result.singular_values
    rows, cols = spec.matrix
    if s is not None and result.method == "exact" and spec.audited is not None and len(s) < min(rows, cols):
        # An adapter's core holds every nonzero singular value of its update: the rest are 0.
        s = np.concatenate([s, np.zeros(min(rows, cols) - len(s))])
    row: dict[str, Any] = {
        "name": spec.name,
        "module": spec.module,
        "layer": spec.layer,
        "role": spec.role,
        "kind": spec.kind,
        "expert": result.index,
        "shape": list(spec.shape),
        "rows": rows,
        "cols": cols,
        "dtype": spec.dtype,
        "numel": rows * cols,
        "nonfinite": result.nonfinite,
        "method": result.method,
        "k": len(s) if s is not None else 0,
        "singular_values": s.tolist() if s is not None else None,
    }
    if s is not None:
        row |= matrix_metrics(s, rows, cols, eps=eps, energy=result.energy)
        row["precision_floor"] = result.floor / result.energy if result.energy > 0 else None
    if result.tail is not None:
        row |= tail_metrics(result.tail, energy=result.energy, floor=result.floor, rows=rows, cols=cols, eps=eps)
    row |= extras or {}
    if row.get("adapter_rank") and row.get("k99") is not None:
        row["adapter_usage"] = row["k99"] / row["adapter_rank"]
    return row


def warn_unpaired(selection: Selection, stacklevel: int = 3) -> None:
    """One warning listing (the first five) names found on one side of a pair only.

    ``stacklevel`` is :func:`warnings.warn`'s: 3 names the line that called this function's caller.
    """
    if selection.unpaired:
        listed = ", ".join(f"{n} ({why})" for n, why in list(selection.unpaired.items())[:5])
        more = f" and {len(selection.unpaired) - 5} more" if len(selection.unpaired) > 5 else ""
        warnings.warn(
            f"{len(selection.unpaired)} tensors not paired with base, skipped: {listed}{more}",
            UnpairedTensorsWarning,
            stacklevel=stacklevel,
        )


def spectrum(path: str | Path, base: str | Path | None = None, **options: Any) -> pd.DataFrame:
    """Singular-value spectrum and metrics of every matrix of a checkpoint, or of ``path - base``.

    Args:
        path: Checkpoint file or model folder (see :func:`open_checkpoint`).
        base: Optional base checkpoint; the audited matrices are then the updates
            ``W_path - W_base`` (kind ``delta``).
        include: Globs on tensor names to audit (all when empty).
        exclude: Globs on tensor names to leave out.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
        dtype: ``float32`` or ``float64``: the dtype of the decomposition.
        max_batch_mb: Budget for one batch of stacked same-shape matrices.
        method: ``exact``, ``randomized`` (top of the spectrum only, grown until each
            energy rank is certified within 1 % or lies in the noise floor; see
            :mod:`lowrank_audit.bounds`), or ``auto`` (exact when the smaller side is at
            most 1024). Figures that need the whole spectrum are null on truncated rows.
        rank_cap: With ``randomized``/``auto``, compute at most this many singular values
            per matrix (energy ranks above it are null unless the bounds certify them).
        seed: Seed of the randomized method; the same seed gives the same report.
        command: Command line recorded in the report's provenance.
        progress: Called with cumulative :class:`Progress` after each batch.
        need: How many top values a truncated row must hold besides what the report's
            ranks ask (:mod:`lowrank_audit.engine.needs`); by default nothing more.
        hashed: Record each input's SHA-256 in the provenance (None without).

    Returns:
        A report frame (columns in :data:`lowrank_audit.report.COLUMNS`), one row per
        matrix, sorted by name and expert; provenance in ``frame.attrs["lowrank_audit"]``.

    Raises:
        CheckpointError: An input is missing, unreadable or unsafe.
        ShapeMismatchError: A tensor's shape differs between ``path`` and ``base``.
        NoMatricesSelected: No tensor qualifies as a matrix after selection.
        OptionError: An option is out of its domain.

    Warns:
        UnpairedTensorsWarning: With ``base``, names present on one side only.

    Example:
        >>> df = spectrum("sample_checkpoints/finetuned.safetensors", base="sample_checkpoints/base.safetensors")
        >>> df.loc[df.role == "down_proj", ["name", "k95"]]  # doctest: +SKIP
    """
    from lowrank_audit.formats.report import build_frame

    return build_frame(*spectrum_rows(path, base, **options))


def spectrum_rows(
    path: str | Path,
    base: str | Path | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    dtype: str = "float32",
    max_batch_mb: float = DEFAULT_MAX_BATCH_MB,
    method: str = DEFAULT_METHOD,
    rank_cap: int | None = None,
    seed: int = 0,
    command: str | None = None,
    progress: ProgressCallback | None = None,
    need: Need = REPORT_NEED,
    hashed: bool = True,
    alignment: bool = False,
) -> ReportRows:
    """:func:`spectrum` before its frame: the rows, sorted by name and expert, and the provenance.

    Without ``hashed`` the inputs' SHA-256 is left out (None): the CLI's table shows no
    digest, and hashing a 7B checkpoint costs seconds of CPU the decomposition could use.
    With ``alignment`` (and a base; implied for an adapter with a base) each row gets
    ``base_angle`` and ``intruder_dimensions`` (:mod:`lowrank_audit.analyses.alignment`).
    """
    config = EngineConfig.create(
        device=device, dtype=dtype, max_batch_mb=max_batch_mb, method=method, rank_cap=rank_cap, seed=seed
    )
    if alignment and base is None:
        raise OptionError("alignment against the base needs --base BASE")
    world = current()  # under torchrun: this process decomposes its share, every process gets every row
    with ExitStack() as stack:
        source: MatrixSource
        if detect(path) is not None:  # a LoRA adapter: its updates, from their factors
            adapter = stack.enter_context(open_adapter(path))
            base_ckpt = stack.enter_context(open_checkpoint(base)) if base is not None else None
            alignment = alignment or base_ckpt is not None  # a base is given to an adapter for nothing else
            selection = Selection(*adapter_specs(adapter, include, exclude))
            digests = stack.enter_context(hashing_inputs(adapter, base_ckpt, hashed=hashed, world=world))
            source = AdapterSource(adapter, world.share(selection.specs, config.cost))
        else:
            ckpt = stack.enter_context(open_checkpoint(path))
            base_ckpt = stack.enter_context(open_checkpoint(base)) if base is not None else None
            selection = select_matrices(ckpt, base=base_ckpt, include=include, exclude=exclude)
            warn_unpaired(selection, stacklevel=4)  # at the line that called spectrum()
            # SHA-256 overlaps the engine
            digests = stack.enter_context(hashing_inputs(ckpt, base_ckpt, hashed=hashed, world=world))
            source = CheckpointSource(ckpt, world.share(selection.specs, config.cost), base=base_ckpt)

        def audit() -> tuple[list[dict[str, Any]], dict[str, Any]]:
            results = spectra(source, config, need=need, progress=progress)
            rows = [report_row(r, config.eps, source.extras.get(r.spec.name)) for r in results]
            if alignment and base_ckpt is not None:
                _align(rows, source, base_ckpt)
            return rows, digests()

        parts = world.gather(audit)
        rows = sorted((row for part, _ in parts for row in part), key=lambda r: (r["name"], r["expert"] or 0))
        inputs = merge_inputs([d for _, d in parts])
    metadata = provenance(
        command=command or f"lowrank_audit.spectrum({str(path)!r}, base={str(base) if base else None!r})",
        inputs=inputs,
        device=config.device_name,
        options={
            "dtype": dtype,
            "max_batch_mb": max_batch_mb,
            "method": method,
            "rank_cap": rank_cap,
            "seed": seed,
            "include": list(include),
            "exclude": list(exclude),
            "alignment": alignment,
        },
        skipped=selection.skipped,
        unpaired=selection.unpaired,
    )
    return rows, metadata


def _align(rows: list[dict[str, Any]], source: MatrixSource, base: Checkpoint) -> None:
    """Add ``base_angle`` and ``intruder_dimensions`` to each row: the base matrix from ``base``,
    the update from the source (a fine-tune's difference, or an adapter module's product).

    Raises:
        ShapeMismatchError: An adapter module's update and its base weight differ in shape.
    """
    specs = {s.name: s for s in source.specs}
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # a 3-D tensor is read once for its experts
    for row in rows:
        spec = specs[row["name"]]
        if spec.name not in stacks:
            stacks.clear()
            if isinstance(source, AdapterSource):
                name = base_tensor(source.adapter, spec.name, base)
                count, *matrix = matrix_view(base.info(name).shape)
                if (count, *matrix) != (1, *spec.matrix):
                    shapes = f"{list(spec.matrix)} but {name!r} in {base.path} is {list(base.info(name).shape)}"
                    raise ShapeMismatchError(f"the update of the adapter's module {spec.name!r} is {shapes}")
                update: torch.Tensor | None = source.adapter.delta(spec.name).reshape(1, *spec.matrix)
            else:  # a checkpoint's delta: selection already checked the shapes
                name, update = spec.name, None
            w0 = base[name].reshape(spec.count, *spec.matrix).double()
            if update is None:
                update = source.ckpt[name].reshape(spec.count, *spec.matrix).double() - w0
            stacks[spec.name] = (w0, update)
        w0, update = stacks[spec.name]
        index = row["expert"] or 0
        rank = row.get("k95") or row.get("k") or None
        row |= alignment_of(w0[index], update[index], rank)


# spectrum() takes spectrum_rows()'s options, declared once there; introspection shows them.
spectrum.__signature__ = inspect.signature(spectrum_rows).replace(return_annotation="pd.DataFrame")  # type: ignore[attr-defined]


def load_spectrum(source: str | Path, base: str | Path | None = None, **options: Any) -> pd.DataFrame:
    """A spectrum report: read from ``source`` when it is a ``.parquet`` report, else computed.

    Args:
        source: A report written by ``spectrum --out``, or a checkpoint.
        base: With a checkpoint, audit ``source - base`` (a report already says what it holds).
        options: Keyword options of :func:`spectrum`, used when it runs.

    Raises:
        OptionError: ``base`` given with a report.
    """
    source = Path(source)
    if source.suffix == ".parquet":
        from lowrank_audit.formats.report import read_report

        if base is not None:
            raise OptionError(f"{source} is a report: --base applies only when SOURCE is a checkpoint")
        return read_report(source)
    return spectrum(source, base, **options)


__all__ = ["ReportRows", "load_spectrum", "report_row", "spectrum", "spectrum_rows", "warn_unpaired"]
