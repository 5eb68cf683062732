"""``compress ADAPTER``: a LoRA adapter resized to the ranks a policy chooses, in its own format.

Each selected module's update ΔW = scale · B A is decomposed exactly from its factors (B =
Q_B R_B and Aᵀ = Q_A R_A, then the SVD of the r × r core scale · R_B R_Aᵀ = U_c S V_cᵀ, so
ΔW = (Q_B U_c) S (Q_A V_c)ᵀ), and truncated to rank k: B' = U_k √S_k, A' = √S_k V_kᵀ, the
best rank-k approximation (Eckart–Young) with balanced factors. The written module has
r = alpha = k (scale 1), in ``rank_pattern``/``alpha_pattern`` (PEFT) or its ``alpha`` tensor
(kohya); modules left out by ``--exclude`` keep their factors and scale. Every other tensor
is copied. Ranks come from :func:`lowrank_audit.ranks.allocate` on the exact spectra, as for
``recommend`` and ``compress``.

kohya's ``resize_lora`` chooses ranks by ``sv_fro`` (keep a share f of the Frobenius norm:
our ``--energy f²``, since energy is its square), ``sv_cumulative`` (a share of the sum of
singular values, the nuclear norm) or ``sv_ratio`` (values above σ₁ / ratio); a fixed rank
is our ``--rank``, and ``--budget-params``/``--avg-rank`` spread a parameter budget where it
keeps the most energy, which kohya has no counterpart for.

The written adapter is re-opened and each module's update measured against the original,
from factors only (the QR of [B', −B] and [A'; A]ᵀ): its distance to the truncation must be
within the stored dtype's tolerance, and the report's ``relative_error`` is that measurement.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from lowrank_audit.analyses.compress import COMPRESS_SCHEMA, REPORT_NAME
from lowrank_audit.analyses.verification import VERIFY_RTOL, VERIFY_RTOL_16BIT
from lowrank_audit.engine.batches import Progress, ProgressCallback
from lowrank_audit.errors import VerificationError
from lowrank_audit.formats import peft
from lowrank_audit.formats.report import build_frame, write_report
from lowrank_audit.io.adapters import CONFIG, Adapter, LoraModule, adapter_specs, core, factorize, open_adapter
from lowrank_audit.io.outputs import atomic_folder, check_target
from lowrank_audit.io.provenance import hashing_inputs, provenance
from lowrank_audit.ranks import LayerSpectrum, RankPolicy, allocate


def _svd(adapter: Adapter, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` in float64 with scale · B A = U diag(S) Vᵀ (B A as stored: an embedding's
    update is its transpose, and its factors keep their orientation)."""
    qb, c, qa = factorize(*adapter.factors(module), adapter.modules[module].scale)
    uc, s, vch = torch.linalg.svd(c)
    return qb @ uc, s, qa @ vch.T


def _padded(s: torch.Tensor, side: int) -> np.ndarray:
    return np.concatenate([s.numpy(), np.zeros(max(0, side - len(s)))])


def _distance(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """‖B1 A1 − B2 A2‖_F from the factors: the core of [B1, −B2] [A1; A2] (no dense product,
    and no cancellation of squared norms)."""
    return float(torch.linalg.norm(core(torch.cat([b1, -b2], 1), torch.cat([a1, a2], 0), 1.0)))


def _shaped(m: LoraModule, adapter: Adapter, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """New 2-D factors in the stored layout and dtype (a kohya conv keeps its kernel dims)."""
    b_info, a_info = adapter.weights.info(m.b), adapter.weights.info(m.a)
    dtype = getattr(torch, a_info.dtype)
    k = a.shape[0]
    b = b.reshape(b.shape[0], k, *b_info.shape[2:])
    a = a.reshape(k, *a_info.shape[1:])
    return b.to(dtype).contiguous(), a.to(dtype).contiguous()


def resize(
    path: str | Path, out: str | Path, policy: RankPolicy | None = None, *, include: Sequence[str] = (),
    exclude: Sequence[str] = (), force: bool = False, command: str | None = None,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Write ``path`` (a PEFT adapter folder or kohya file) resized under ``policy`` into the folder ``out``.

    Returns:
        The compress report (:data:`~lowrank_audit.analyses.compress.COMPRESS_COLUMNS`, one
        row per resized module, treatment ``resized``), also written to
        ``out/compress-report.parquet``; the adapter is ``out/adapter_config.json`` and
        ``out/adapter_model.safetensors`` (PEFT) or ``out/<file name>`` (kohya).

    Raises:
        OptionError: ``out`` exists without ``force`` or is an input.
        CheckpointError: The adapter is unreadable or not an adapter.
        NoMatricesSelected: No module is selected.
        VerificationError: A written module does not reproduce its truncation within its
            dtype's tolerance. Nothing is written then.
    """
    policy = policy or RankPolicy.create()
    with open_adapter(path) as adapter, hashing_inputs(adapter) as digests:
        out = check_target(out, [adapter.path], force=force, folder=True)
        specs, _ = adapter_specs(adapter, include, exclude)
        svds = {spec.name: _svd(adapter, spec.name) for spec in specs}
        # The update's whole spectrum: its core's values, then zeros (so a rank above r is
        # allowed); no module is given more than the values it has (kohya keeps the smaller too).
        layers = [
            LayerSpectrum(
                s.name, *s.matrix, _padded(svds[s.name][1], min(s.matrix)), float(svds[s.name][1].square().sum())
            )
            for s in specs
        ]
        ranks = {a.name: min(a.rank, len(svds[a.name][1])) for a in allocate(layers, policy)}
        tensors = {name: adapter.weights[name] for name in adapter.weights}
        new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, (name, k) in enumerate(ranks.items()):
            u, s, v = svds[name]
            root = s[:k].sqrt()
            m = adapter.modules[name]
            new[name] = (u[:, :k] * root, root[:, None] * v[:, :k].T)
            tensors[m.b], tensors[m.a] = _shaped(m, adapter, *new[name])
            if adapter.format == "kohya":
                tensors[f"{name}.alpha"] = torch.tensor(float(k), dtype=torch.float32)
            if progress is not None:
                progress(Progress(i + 1, len(ranks), 0, 0, stage="resize"))
        with atomic_folder(out, force=force) as tmp:
            written = _write(adapter, tensors, ranks, tmp)
            rows = _verify(adapter, written, new, svds, ranks)
            frame = build_frame(rows, _metadata(adapter, policy, digests(), command), schema=COMPRESS_SCHEMA)
            write_report(frame, tmp / REPORT_NAME, schema=COMPRESS_SCHEMA)
    return frame


def _write(adapter: Adapter, tensors: dict[str, torch.Tensor], ranks: dict[str, int], folder: Path) -> Path:
    if adapter.format == "kohya":
        from safetensors import safe_open

        with safe_open(str(adapter.path), "pt") as original:  # training metadata (ss_*, modelspec.*) stays
            metadata = original.metadata() or {"format": "pt"}
        target = folder / adapter.path.name
        save_file({n: t.contiguous() for n, t in tensors.items()}, target, metadata=metadata)
        return target
    config = dict(adapter.config)
    scales = {name: (ranks.get(name), m) for name, m in adapter.modules.items()}
    rank_of = {name: k if k is not None else m.rank for name, (k, m) in scales.items()}
    # alpha = r gives scale 1 where resized; a module kept as it was keeps its scale without rsLoRA.
    alpha_of = {name: float(k) if k is not None else m.scale * m.rank for name, (k, m) in scales.items()}
    common = Counter(rank_of.values()).most_common(1)[0][0]
    config |= {
        "r": common,
        "lora_alpha": common,
        "use_rslora": False,
        "rank_pattern": {peft.module_pattern(n): r for n, r in sorted(rank_of.items())},
        "alpha_pattern": {peft.module_pattern(n): _number(a) for n, a in sorted(alpha_of.items())},
    }
    save_file({n: t.contiguous() for n, t in tensors.items()}, folder / peft.WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _verify(
    adapter: Adapter, written: Path, new: dict[str, tuple[torch.Tensor, torch.Tensor]],
    svds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], ranks: dict[str, int],
) -> list[dict[str, Any]]:  # fmt: skip
    """Re-open what was written; each module's update against its truncation and the original."""
    rows = []
    with open_adapter(written) as again:
        for name, k in ranks.items():
            m, w = adapter.modules[name], again.modules[name]
            b, a = (t.double() for t in adapter.factors(name))
            b2, a2 = (t.double() for t in again.factors(name))
            b2 = b2 * w.scale
            s = svds[name][1]
            energy = float(s.square().sum())
            drift = _distance(b2, a2, *new[name]) / math.sqrt(float(s[:k].square().sum())) if energy > 0 else 0.0
            stored = getattr(torch, adapter.weights.info(m.a).dtype)
            rtol = VERIFY_RTOL.get(stored, VERIFY_RTOL_16BIT)
            if not drift <= rtol:
                raise VerificationError(
                    f"module {name!r} reproduces its rank-{k} truncation only to {drift:.1e} relative "
                    f"(tolerance {rtol:.0e}); nothing written"
                )
            error = _distance(b2, a2, b * m.scale, a) / math.sqrt(energy) if energy > 0 else 0.0
            kept = min(float(s[:k].square().sum()) / energy, 1.0) if energy > 0 else 1.0
            if not abs(error - math.sqrt(1.0 - kept)) <= 2 * rtol + 1e-6:  # Eckart–Young: the error of a truncation
                raise VerificationError(
                    f"module {name!r}: the written update is {error:.3g} from the original, but its rank-{k} "
                    f"truncation should be {math.sqrt(1.0 - kept):.3g}; nothing written"
                )
            rows_, cols_ = m.shape[0], math.prod(m.shape[1:])
            rows.append({
                "name": name, "module": name, "treatment": "resized", "rows": rows_, "cols": cols_, "rank": k,
                "params_before": m.rank * (rows_ + cols_), "params_after": k * (rows_ + cols_),
                "energy_kept": kept,
                "relative_error": error, "update_share": energy, "calibrated": False,
            })  # fmt: skip
    total = sum(r["update_share"] for r in rows)
    for r in rows:
        r["update_share"] = r["update_share"] / total if total > 0 else 0.0
    return rows


def _metadata(adapter: Adapter, policy: RankPolicy, inputs: dict[str, Any], command: str | None) -> dict[str, Any]:
    return provenance(
        command=command or f"lowrank_audit.compress({str(adapter.path)!r}, ...)",
        inputs=inputs,
        policy=policy.describe(),
        options={"adapter_format": adapter.format},
    )


__all__ = ["resize"]
