"""``recommend``: per-layer LoRA ranks from a spectrum report or a checkpoint audited on the fly.

A checkpoint is audited for exactly what the rank policy needs: an energy target grows
each randomized sketch until the top values hold it (0.995 included, above the report's
0.99), a fixed rank computes at least that many values, and a budget the report's
spectrum. Matrices that did not change (a zero update, or a zero matrix) are left out of
the ranks and of ``target_modules``; their names are in ``attrs["lowrank_audit"]["unchanged"]``.
"""

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


def lora_targets(report: pd.DataFrame) -> pd.Series:
    """Rows of a spectrum report that a LoRA adapter can target: linear and convolution
    weights (a conv kernel as its out x in*kh*kw matrix, as PEFT's conv LoRA factors it),
    not the experts of a stacked 3-D tensor."""
    return report["expert"].isna()


def nonfinite_targets(report: pd.DataFrame) -> dict[str, int]:
    """LoRA targets that hold NaN/Inf, with their counts: they get no rank."""
    bad = report[lora_targets(report) & (report["nonfinite"] > 0)]
    return {str(n): int(c) for n, c in zip(bad["name"], bad["nonfinite"], strict=True)}


def layers_from_report(report: pd.DataFrame) -> list[LayerSpectrum]:
    """The finite LoRA targets of a spectrum report (:func:`lora_targets`).

    Raises:
        OptionError: The report holds no such matrix.
    """
    rows = report[lora_targets(report) & (report["method"] != "skipped")]
    if rows.empty:
        bad = nonfinite_targets(report)
        why = f" (NaN/Inf in {', '.join(bad)})" if bad else ""
        raise OptionError(f"the report holds no finite matrix to recommend a rank for{why}")
    energies = rows["frobenius_norm"].astype(float) ** 2
    floors = rows["precision_floor"].astype(float).fillna(0.0) * energies  # null in reports of earlier versions
    return [
        LayerSpectrum(r["name"], int(r["rows"]), int(r["cols"]), np.asarray(r["singular_values"], float), e, f)
        for r, e, f in zip(rows.to_dict("records"), energies, floors, strict=True)
    ]


def recommend(
    source: pd.DataFrame | str | Path, policy: RankPolicy | None = None, *, base: str | Path | None = None,
    **options: Any,
) -> pd.DataFrame:  # fmt: skip
    """One LoRA rank per changed 2-D matrix of a spectrum report or checkpoint (see :mod:`lowrank_audit.ranks`).

    Args:
        source: A spectrum report (a frame, or a ``.parquet`` path), or a checkpoint,
            audited for what ``policy`` needs.
        policy: How ranks are chosen; energy 0.95 when None.
        base: With a checkpoint, recommend ranks for ``source - base``.
        options: Keyword options of :func:`lowrank_audit.spectrum` when a checkpoint is audited.

    Returns:
        A frame with :data:`RANKS_COLUMNS`, one row per matrix with a nonzero update;
        ``attrs["lowrank_audit"]`` holds the policy, the spectrum's provenance, under
        ``unchanged`` the names of the matrices left out because they did not change, and
        under ``nonfinite`` those left out because they hold NaN/Inf (name -> count).

    Raises:
        OptionError: ``base`` with a report; a report with no 2-D matrix; a truncated
            spectrum too short for the policy (audit the checkpoint, or use ``--method exact``).
    """
    from lowrank_audit.analyses.spectrum import load_spectrum
    from lowrank_audit.engine.needs import REPORT_NEED

    policy = policy or RankPolicy.create()
    # A checkpoint is audited for what the policy needs (a budget needs the report's spectra).
    need = policy.rank_for if policy.per_matrix else REPORT_NEED
    report = source if isinstance(source, pd.DataFrame) else load_spectrum(source, base, need=need, **options)
    layers = layers_from_report(report)
    modules = dict(zip(report["name"], report["module"], strict=True))
    changed = [layer for layer in layers if layer.energy > 0]
    rows = [
        {"name": a.name, "module": modules[a.name], "rows": lay.rows, "cols": lay.cols, "rank": a.rank,
         "energy_kept": a.energy_kept, "params": a.params}
        for lay, a in zip(changed, allocate(changed, policy), strict=True)
    ]  # fmt: skip
    meta = {
        "policy": policy.describe(),
        "spectrum": report.attrs.get("lowrank_audit", {}),
        "unchanged": [layer.name for layer in layers if layer.energy == 0],
        "nonfinite": nonfinite_targets(report),
    }
    return build_frame(rows, meta, schema=RANKS_SCHEMA)


def peft_config(ranks: pd.DataFrame) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict: every module a target, its rank in rank_pattern/alpha_pattern."""
    return peft.lora_config(dict(zip(ranks["module"], (int(r) for r in ranks["rank"]), strict=True)))


__all__ = ["RANKS_COLUMNS", "RANKS_SCHEMA", "layers_from_report", "lora_targets", "nonfinite_targets", "peft_config",
           "recommend"]  # fmt: skip
