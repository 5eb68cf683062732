"""``recommend``: per-layer LoRA ranks from a spectrum report or a checkpoint audited on the fly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from lowrank_audit.errors import OptionError
from lowrank_audit.formats import peft
from lowrank_audit.formats.report import build_frame, schema_of
from lowrank_audit.ranks import LayerSpectrum, RankPolicy, allocate

RANKS_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("name", pa.string(), "tensor name"),
    ("module", pa.string(), "module path, as PEFT's target_modules takes it"),
    ("rows", pa.int64(), "rows of the matrix"),
    ("cols", pa.int64(), "columns of the matrix"),
    ("rank", pa.int64(), "recommended LoRA rank"),
    ("energy_kept", pa.float64(), "share of ||W||_F^2 (or ||ΔW||_F^2) the top-rank components hold"),
    ("params", pa.int64(), "adapter parameters: rank * (rows + cols)"),
)
RANKS_SCHEMA = schema_of(RANKS_COLUMNS)


def layers_from_report(report: pd.DataFrame) -> list[LayerSpectrum]:
    """The 2-D matrices of a spectrum report (experts and non-finite rows are not LoRA targets).

    Raises:
        OptionError: The report holds no such matrix.
    """
    rows = report[report["expert"].isna() & (report["method"] != "skipped") & (report["shape"].map(len) == 2)]
    if rows.empty:
        raise OptionError("the report holds no finite 2-D matrix to recommend a rank for")
    energies = rows["frobenius_norm"].astype(float) ** 2
    return [
        LayerSpectrum(r["name"], int(r["rows"]), int(r["cols"]), np.asarray(r["singular_values"], float), e)
        for r, e in zip(rows.to_dict("records"), energies, strict=True)
    ]


def recommend(
    source: pd.DataFrame | str | Path, policy: RankPolicy | None = None, *, base: str | Path | None = None,
    **options: Any,
) -> pd.DataFrame:  # fmt: skip
    """One LoRA rank per 2-D matrix of a spectrum report or checkpoint (see :mod:`lowrank_audit.ranks`).

    Args:
        source: A spectrum report (a frame, or a ``.parquet`` path), or a checkpoint.
        policy: How ranks are chosen; energy 0.95 when None.
        base: With a checkpoint, recommend ranks for ``source - base``.
        options: Keyword options of :func:`lowrank_audit.spectrum` when a checkpoint is audited.

    Returns:
        A frame with :data:`RANKS_COLUMNS`; ``attrs["lowrank_audit"]`` holds the policy
        and the spectrum report's provenance.
    """
    from lowrank_audit.analyses.spectrum import load_spectrum

    policy = policy or RankPolicy.create()
    report = source if isinstance(source, pd.DataFrame) else load_spectrum(source, base, **options)
    layers = layers_from_report(report)
    modules = dict(zip(report["name"], report["module"], strict=True))
    rows = [
        {"name": a.name, "module": modules[a.name], "rows": lay.rows, "cols": lay.cols, "rank": a.rank,
         "energy_kept": a.energy_kept, "params": a.params}
        for lay, a in zip(layers, allocate(layers, policy), strict=True)
    ]  # fmt: skip
    meta = {"policy": policy.describe(), "spectrum": report.attrs.get("lowrank_audit", {})}
    return build_frame(rows, meta, schema=RANKS_SCHEMA)


def peft_config(ranks: pd.DataFrame) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict: every module a target, its rank in rank_pattern/alpha_pattern."""
    return peft.lora_config(dict(zip(ranks["module"], (int(r) for r in ranks["rank"]), strict=True)))


__all__ = ["RANKS_COLUMNS", "RANKS_SCHEMA", "layers_from_report", "peft_config", "recommend"]
