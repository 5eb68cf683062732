"""The report: one row per matrix, columns declared once here, Parquet on disk.

A report is a :class:`pandas.DataFrame` whose ``attrs["lowrank_audit"]`` holds the
provenance (tool version, command, inputs with size and SHA-256, device, torch
version, options, skipped tensors). :func:`write_report` stores that dict as Parquet
file metadata under the key ``lowrank_audit``; :func:`read_report` restores it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lowrank_audit.errors import CheckpointError
from lowrank_audit.io.outputs import atomic_file

METADATA_KEY = "lowrank_audit"
# (column, type, meaning). The order is the file's column order; tests pin it.
COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("name", pa.string(), "tensor name in the checkpoint"),
    ("module", pa.string(), "module path: the name without its trailing '.weight'"),
    ("layer", pa.int64(), "first integer component of the name (null when none)"),
    ("role", pa.string(), "last component of the module path: q_proj, up_proj, embed_tokens, ..."),
    (
        "kind",
        pa.string(),
        "weight, delta (fine-tuned minus base), activation (a module's input rows), or adapter (a LoRA "
        "module's update scale * B A)",
    ),
    ("expert", pa.int64(), "index of the matrix in a 3-D tensor (null for 2-D and conv tensors)"),
    ("shape", pa.list_(pa.int64()), "stored tensor shape"),
    ("rows", pa.int64(), "rows of the audited matrix (for activations: the input rows N)"),
    ("cols", pa.int64(), "columns of the audited matrix (for activations: the width d)"),
    ("dtype", pa.string(), "stored dtype of the (fine-tuned) tensor"),
    ("numel", pa.int64(), "entries of the audited matrix: rows * cols"),
    ("frobenius_norm", pa.float64(), "||W||_F"),
    ("spectral_norm", pa.float64(), "largest singular value"),
    ("nuclear_norm", pa.float64(), "sum of singular values"),
    ("stable_rank", pa.float64(), "||W||_F^2 / ||W||_2^2"),
    ("effective_rank", pa.float64(), "entropy effective rank (Roy & Vetterli)"),
    ("numerical_rank", pa.int64(), "singular values above s1 * max(rows, cols) * eps(compute dtype)"),
    (
        "k90",
        pa.int64(),
        "smallest k keeping 90 % of the energy sum(s^2); on truncated rows certified (never below "
        "the exact rank, at most 1 % above) or null",
    ),
    ("k95", pa.int64(), "smallest k keeping 95 % of the energy (as k90)"),
    ("k99", pa.int64(), "smallest k keeping 99 % of the energy (as k90)"),
    ("k90_lo", pa.int64(), "lower end of an interval that holds the exact k90 (equal to k90 on exact rows)"),
    ("k90_hi", pa.int64(), "upper end of that interval"),
    ("k95_lo", pa.int64(), "lower end of an interval that holds the exact k95"),
    ("k95_hi", pa.int64(), "upper end of that interval"),
    ("k99_lo", pa.int64(), "lower end of an interval that holds the exact k99"),
    ("k99_hi", pa.int64(), "upper end of that interval"),
    ("k95_ratio", pa.float64(), "k95 / min(rows, cols)"),
    (
        "signal_rank",
        pa.int64(),
        "singular values above the Gavish-Donoho optimal hard threshold (null on truncated "
        "rows whose sketch stopped above the noise)",
    ),
    (
        "noise_sigma",
        pa.float64(),
        "estimated noise level per entry (Gavish-Donoho median rule; on truncated rows "
        "from the residual energy and the Marchenko-Pastur law)",
    ),
    ("noise_share", pa.float64(), "share of ||W||_F^2 in the noise floor: noise_sigma^2 * rows * cols / ||W||_F^2"),
    (
        "precision_floor",
        pa.float64(),
        "share of ||W||_F^2 that rounding to the stored dtype puts in (both tensors of a delta)",
    ),
    ("condition_number", pa.float64(), "s1 / s_min (inf when s_min is 0)"),
    ("adapter_rank", pa.int64(), "declared LoRA rank r of an adapter's module (null for other kinds)"),
    ("adapter_scale", pa.float64(), "the adapter's scale: lora_alpha / r (alpha / sqrt(r) with rsLoRA)"),
    (
        "adapter_usage",
        pa.float64(),
        "k99 / adapter_rank: the share of its declared rank an adapter's update needs for 99 % of its energy",
    ),
    ("factor_norm_ratio", pa.float64(), "||B||_F / ||A||_F of an adapter's stored factors"),
    (
        "factor_imbalance",
        pa.float64(),
        "||B^T B - A A^T||_F / (||B||_F ||A||_F): 0 for balanced factors; gradient flow conserves the numerator",
    ),
    (
        "base_angle",
        pa.float64(),
        "largest principal angle (degrees) between the update's top-k95 left singular subspace and the "
        "base's (with --alignment)",
    ),
    (
        "intruder_dimensions",
        pa.int64(),
        "of the top 10 left singular vectors of base + update, those with cosine below 0.5 to every "
        "base singular vector (with --alignment)",
    ),
    ("nonfinite", pa.int64(), "NaN or Inf entries (for activations: rows); such matrices are not decomposed"),
    ("method", pa.string(), "exact, randomized (top k only), or skipped (non-finite entries)"),
    ("k", pa.int64(), "number of singular values computed (min(rows, cols) when exact)"),
    ("singular_values", pa.list_(pa.float64()), "the computed singular values, descending"),
)


def schema_of(columns: Sequence[tuple[str, pa.DataType, str]]) -> pa.Schema:
    """The Arrow schema of a report's ``(column, type, meaning)`` declarations."""
    return pa.schema([(name, dtype) for name, dtype, _ in columns])


SCHEMA = schema_of(COLUMNS)
_PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.float64(): pd.Float64Dtype(), pa.string(): pd.StringDtype()}


def build_frame(
    rows: Sequence[dict[str, Any]], metadata: dict[str, Any] | None = None, *, schema: pa.Schema = SCHEMA
) -> pd.DataFrame:
    """A report DataFrame from row dicts keyed by the schema's columns, nulls kept as ``<NA>``."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    return _to_frame(table, metadata or {})


def _to_frame(table: pa.Table, metadata: dict[str, Any]) -> pd.DataFrame:
    frame = table.to_pandas(types_mapper=_PANDAS_TYPES.get)
    frame.attrs[METADATA_KEY] = metadata
    return frame


def write_report(frame: pd.DataFrame, path: str | Path, *, schema: pa.Schema = SCHEMA, force: bool = False) -> Path:
    """Write a report to Parquet atomically (:func:`lowrank_audit.io.outputs.atomic_file`).

    The file carries pandas' own metadata besides ours, so plain ``pd.read_parquet``
    restores the nullable integer columns (``layer``, ``expert``, ranks) as ``Int64``.

    Args:
        frame: A report from :func:`build_frame` (or read back by :func:`read_report`).
        path: Destination; parent folders are created.
        schema: The frame's schema: the spectrum report's unless another report's.
        force: Replace an existing file.

    Returns:
        The path written.

    Raises:
        OptionError: ``path`` exists and ``force`` is False.
    """
    path = Path(path)
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    meta = json.dumps(frame.attrs.get(METADATA_KEY, {}), sort_keys=True, default=str)
    table = table.replace_schema_metadata((table.schema.metadata or {}) | {METADATA_KEY.encode(): meta.encode()})
    with atomic_file(path, force=force) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_report(path: str | Path, *, schema: pa.Schema = SCHEMA) -> pd.DataFrame:
    """Read a report written by :func:`write_report` (with ``schema``), provenance in ``attrs``.

    Raises:
        CheckpointError: The file is missing or is not a lowrank-audit report.
    """
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise CheckpointError(f"{path}: cannot read Parquet report: {exc}") from exc
    raw = (table.schema.metadata or {}).get(METADATA_KEY.encode())
    names = table.schema.names
    # A report of an earlier version lacks the columns added since (in schema order); they read as null.
    if raw is None or [name for name in schema.names if name in names] != names:
        raise CheckpointError(f"{path}: not a lowrank-audit report of this kind (columns or metadata missing)")
    for name in schema.names:
        if name not in names:
            table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
    return _to_frame(table.select(schema.names).cast(schema), json.loads(raw))


__all__ = [
    "COLUMNS",
    "METADATA_KEY",
    "SCHEMA",
    "build_frame",
    "read_report",
    "schema_of",
    "write_report",
]
