"""``compress``: spectra -> ranks -> factors -> files, verified after writing.

With a base, the update ΔW = W_ft - W_base becomes a PEFT LoRA adapter; without one, each
selected matrix W becomes two factors in a factorized checkpoint. Both run the same four
steps: the engine's spectra choose ranks (:mod:`lowrank_audit.ranks`), the engine's
factors split each matrix as B = U sqrt(S), A = sqrt(S) Vh, the files are written to a
temporary folder, then re-opened and checked before the folder takes its final name.

Every tensor of a fine-tune that differs from its base gets exactly one treatment, shown
in the report's ``treatment`` column:

- ``lora``: 2-D weight of a Linear layer (and ``lm_head`` with ``embeddings="lora"``);
- ``lora_bias``: the bias delta of a LoRA layer, as ``lora_B.bias`` (PEFT ``lora_bias``);
- ``lora_embedding``: an embedding matrix with ``embeddings="lora"``;
- ``modules_to_save``: the whole fine-tuned module (embeddings and ``lm_head`` by default,
  norms, tensors with more than two dimensions);
- ``left_out``: not in the adapter, with its share of ||ΔW||^2 (``serving_safe``,
  ``exclude``), so nothing is dropped silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from safetensors import safe_open

from lowrank_audit.engine.batches import ProgressCallback
from lowrank_audit.engine.config import DEFAULT_MAX_BATCH_MB, DEFAULT_METHOD, EngineConfig
from lowrank_audit.engine.decompose import Factors, factors, spectra
from lowrank_audit.engine.sources import CheckpointSource
from lowrank_audit.errors import LowrankAuditError, OptionError
from lowrank_audit.formats import lowrank, peft
from lowrank_audit.formats.peft import Plan, module_of
from lowrank_audit.formats.report import build_frame, schema_of, write_report
from lowrank_audit.io.checkpoint import Checkpoint, open_checkpoint
from lowrank_audit.io.outputs import atomic_folder, check_target
from lowrank_audit.io.provenance import checkpoint_inputs, provenance
from lowrank_audit.io.selection import select_matrices
from lowrank_audit.ranks import LayerSpectrum, RankPolicy, allocate

REPORT_NAME = "compress-report.parquet"
# Factors stored in the fine-tune's dtype must reproduce the truncated matrix to this
# relative Frobenius error; 16-bit storage rounds each factor entry by up to 2^-8.
VERIFY_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
VERIFY_RTOL_16BIT = 2e-2

COMPRESS_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("name", pa.string(), "tensor name in the checkpoint"),
    ("module", pa.string(), "module path"),
    ("treatment", pa.string(), "lora, lora_bias, lora_embedding, modules_to_save, left_out, factorized, dense"),
    ("rows", pa.int64(), "rows of the matrix (null for 1-D tensors)"),
    ("cols", pa.int64(), "columns of the matrix (null for 1-D tensors)"),
    ("rank", pa.int64(), "rank kept (null when not factorized)"),
    ("params_before", pa.int64(), "entries of the dense tensor"),
    ("params_after", pa.int64(), "entries written for it: r (m + n) for factors, all for saved, 0 left out"),
    ("energy_kept", pa.float64(), "share of ||W||_F^2 (or ||ΔW||_F^2) the written tensors hold"),
    ("relative_error", pa.float64(), "||W - written||_F / ||W||_F, measured on the written file"),
    ("update_share", pa.float64(), "share of the whole ||ΔW||_F^2 (or ||W||_F^2) in this tensor"),
)
COMPRESS_SCHEMA = schema_of(COMPRESS_COLUMNS)


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _plan_factorized(ckpt: Checkpoint, include: Sequence[str], exclude: Sequence[str]) -> Plan:
    specs = [s for s in select_matrices(ckpt, include=include, exclude=exclude).specs if len(s.shape) == 2]
    return Plan({s.name: "factorized" for s in specs}, specs)


def _ranks(
    plan: Plan, ckpt: Checkpoint, base: Checkpoint | None, policy: RankPolicy, config: EngineConfig,
    progress: ProgressCallback | None,
) -> tuple[dict[str, int], dict[str, float]]:  # fmt: skip
    """Ranks by the policy, from the engine's spectra; and each matrix's ||W||_F^2."""
    layers: dict[str, LayerSpectrum] = {}
    for result in spectra(CheckpointSource(ckpt, plan.specs, base), config, progress=progress):
        if result.singular_values is None:
            raise LowrankAuditError(f"{ckpt.path}: tensor {result.spec.name!r} has NaN/Inf entries, not factorized")
        spec = result.spec
        layers[spec.name] = LayerSpectrum(spec.name, spec.rows, spec.cols, result.singular_values, result.energy)
    ordered = [layers[s.name] for s in plan.specs]
    allocation = allocate(ordered, policy) if ordered else []
    return {a.name: a.rank for a in allocation}, {n: layer.energy for n, layer in layers.items()}


def _split(f: Factors, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``(A, B)``: B = U sqrt(S) [m, r], A = sqrt(S) Vh [r, n], in ``dtype``."""
    root = f.s.sqrt()
    return (root[:, None] * f.vh).to(dtype), (f.u * root).to(dtype)


def _exact_update(name: str, ckpt: Checkpoint, base: Checkpoint | None) -> torch.Tensor:
    w = ckpt[name].to(torch.float64)
    return w - base[name].to(torch.float64) if base is not None else w


def compress(
    path: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    policy: RankPolicy | None = None,
    embeddings: str = "save",
    serving_safe: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    force: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    max_batch_mb: float = DEFAULT_MAX_BATCH_MB,
    method: str = DEFAULT_METHOD,
    seed: int = 0,
    command: str | None = None,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Write a PEFT LoRA adapter of ``path - base`` (with ``base``) or a factorized checkpoint.

    Args:
        path: Fine-tuned checkpoint (with ``base``) or any checkpoint.
        out: Output folder: ``adapter_model.safetensors`` and ``adapter_config.json``, or
            ``model.safetensors``; ``compress-report.parquet`` beside them.
        base: Base checkpoint; its presence selects the adapter.
        policy: Rank choice (:class:`RankPolicy`); energy 0.95 when None.
        embeddings: ``save`` (embeddings and lm_head as ``modules_to_save``) or ``lora``.
        serving_safe: Adapter with LoRA on Linear layers only: no ``modules_to_save``, no
            ``lora_bias``, no embedding or lm_head LoRA; the rest is reported ``left_out``.
        include, exclude: Globs on tensor names to factorize.
        force: Replace an existing output folder.
        device, dtype, max_batch_mb, method, seed: As for :func:`lowrank_audit.spectrum`.
        command: Command line recorded in the report's provenance.
        progress: Called with cumulative progress after each batch of each stage.

    Returns:
        The compress report (columns in :data:`COMPRESS_COLUMNS`), also written to
        ``out/compress-report.parquet``.

    Raises:
        OptionError: Conflicting or invalid options, or ``out`` exists without ``force``
            or clashes with an input.
        CheckpointError: An input is unreadable, or base and fine-tune do not pair.
        LowrankAuditError: A matrix holds NaN/Inf, or verification of the written files
            fails. Nothing is written then.
    """
    if embeddings not in peft.EMBEDDINGS:
        raise OptionError(f"embeddings must be one of {', '.join(peft.EMBEDDINGS)} but got {embeddings!r}")
    policy = policy or RankPolicy.create()
    config = EngineConfig.create(device=device, dtype=dtype, max_batch_mb=max_batch_mb, method=method, seed=seed)
    with ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(path))
        base_ckpt = stack.enter_context(open_checkpoint(base)) if base is not None else None
        out = check_target(out, [ckpt.path, *([base_ckpt.path] if base_ckpt else [])], force=force, folder=True)
        if base_ckpt is not None:
            plan = peft.plan_adapter(ckpt, base_ckpt, embeddings=embeddings, serving_safe=serving_safe,
                                     include=include, exclude=exclude)  # fmt: skip
        else:
            if serving_safe or embeddings != "save":
                raise OptionError("--serving-safe and --embeddings apply to adapters: give --base")
            plan = _plan_factorized(ckpt, include, exclude)
        ranks, energies = _ranks(plan, ckpt, base_ckpt, policy, config, progress)
        with atomic_folder(out, force=force) as tmp:
            if base_ckpt is not None:
                rows = _write_adapter(plan, ranks, ckpt, base_ckpt, config, tmp, progress)
            else:
                rows = _write_factorized(plan, ranks, ckpt, config, tmp, progress)
            total = sum(r["update_share"] for r in rows)
            for r in rows:
                r["update_share"] = r["update_share"] / total if total > 0 else 0.0
            metadata = provenance(
                command=command or f"lowrank_audit.compress({str(path)!r}, {str(out)!r}, base={base!r})",
                inputs=checkpoint_inputs(ckpt, base_ckpt),
                device=config.device_name,
                policy=policy.describe(),
                options={"embeddings": embeddings, "serving_safe": serving_safe, "method": method, "seed": seed},
            )
            frame = build_frame(rows, metadata, schema=COMPRESS_SCHEMA)
            write_report(frame, tmp / REPORT_NAME, schema=COMPRESS_SCHEMA)
    return frame


def _row(name: str, treatment: str, shape: Sequence[int], **values: Any) -> dict[str, Any]:
    matrix = len(shape) == 2
    row = {
        "name": name,
        "module": module_of(name)[0],
        "treatment": treatment,
        "rows": shape[0] if matrix else None,
        "cols": shape[1] if matrix else None,
        "rank": None,
        "params_before": math.prod(shape),
    }
    return row | values


def _write_adapter(
    plan: Plan, ranks: dict[str, int], ckpt: Checkpoint, base: Checkpoint, config: EngineConfig, folder: Path,
    progress: ProgressCallback | None,
) -> list[dict[str, Any]]:  # fmt: skip
    tensors: dict[str, torch.Tensor] = {}
    made: dict[str, Factors] = {}
    for f in factors(CheckpointSource(ckpt, plan.specs, base), ranks, config, progress=progress):
        name = f.spec.name
        module = module_of(name)[0]
        a, b = _split(f, _torch_dtype(f.spec.dtype))
        if plan.treatment[name] == "lora_embedding":
            # PEFT's Embedding adds (one_hot(x) @ A^T) @ B^T: A^T = U sqrt(S), B^T = sqrt(S) Vh.
            names = peft.embedding_names(module)
            tensors[names[0]], tensors[names[1]] = b.T, a.T
        else:
            names = peft.lora_names(module)
            tensors[names[0]], tensors[names[1]] = a, b
        made[name] = f
    lora_modules = {module_of(n)[0]: n for n, t in plan.treatment.items() if t in ("lora", "lora_embedding")}
    lora_bias = any(t == "lora_bias" for t in plan.treatment.values())
    saved = set()
    for name, treatment in sorted(plan.treatment.items()):
        if treatment == "lora_bias":
            tensors[peft.lora_bias_name(module_of(name)[0])] = ckpt[name] - base[name]
        elif treatment == "modules_to_save":
            tensors[peft.saved_name(name)] = ckpt[name]
            saved.add(module_of(name)[0])
    if lora_bias:
        # PEFT gives every LoRA layer a bias once lora_bias is set: zero where nothing changed.
        for module, weight in lora_modules.items():
            if plan.treatment[weight] == "lora":
                rows = ckpt.info(weight).shape[0]
                tensors.setdefault(
                    peft.lora_bias_name(module), torch.zeros(rows, dtype=_torch_dtype(made[weight].spec.dtype))
                )
    config_json = peft.lora_config(
        {module_of(n)[0]: ranks[n] for n in made}, modules_to_save=saved, lora_bias=lora_bias
    )
    peft.write_adapter(tensors, config_json, folder)
    return _verify_adapter(plan, made, ckpt, base, folder / peft.WEIGHTS_NAME)


def _verify_adapter(
    plan: Plan, made: dict[str, Factors], ckpt: Checkpoint, base: Checkpoint, written: Path
) -> list[dict[str, Any]]:
    """Re-open the adapter and measure each tensor against the update it stands for."""
    rows = []
    with safe_open(str(written), "pt") as adapter:
        for name, treatment in sorted(plan.treatment.items()):
            delta = _exact_update(name, ckpt, base)
            energy = float(delta.square().sum())
            shape = list(delta.shape)
            module = module_of(name)[0]
            if name in made:
                if treatment == "lora_embedding":
                    a_t, b_t = (adapter.get_tensor(k).double() for k in peft.embedding_names(module))
                    approx = a_t.T @ b_t.T
                else:
                    a, b = (adapter.get_tensor(k).double() for k in peft.lora_names(module))
                    approx = b @ a
                values = _check_factors(name, made[name], approx, delta, ckpt)
                rank = made[name].s.numel()
                values |= {"rank": rank, "params_after": rank * sum(shape)}
            elif treatment == "lora_bias":
                got = adapter.get_tensor(peft.lora_bias_name(module)).double()
                values = _stored_values(got, delta) | {"params_after": delta.numel()}
            elif treatment == "modules_to_save":
                if not torch.equal(adapter.get_tensor(peft.saved_name(name)), ckpt[name]):
                    raise LowrankAuditError(f"{written}: saved tensor {name!r} differs from {ckpt.path}")
                values = {"params_after": delta.numel(), "energy_kept": 1.0, "relative_error": 0.0}
            else:  # left_out
                values = {"params_after": 0, "energy_kept": 0.0, "relative_error": 1.0 if energy > 0 else 0.0}
            rows.append(_row(name, treatment, shape, **values, update_share=energy))
    return rows


def _stored_values(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    norm = float(torch.linalg.vector_norm(want))
    err = float(torch.linalg.vector_norm(got - want)) / norm if norm > 0 else 0.0
    return {"energy_kept": 1.0, "relative_error": err}


def _check_factors(
    name: str, f: Factors, approx: torch.Tensor, matrix: torch.Tensor, ckpt: Checkpoint
) -> dict[str, float]:
    """Written factors against the truncated matrix (must agree) and against the original."""
    truncated = (f.u.double() * f.s.double()) @ f.vh.double()
    scale = float(torch.linalg.matrix_norm(truncated))
    drift = float(torch.linalg.matrix_norm(approx - truncated)) / scale if scale > 0 else 0.0
    stored = _torch_dtype(f.spec.dtype)
    rtol = VERIFY_RTOL.get(stored, VERIFY_RTOL_16BIT)
    if drift > rtol:
        raise LowrankAuditError(
            f"{ckpt.path}: the factors written for {name!r} reproduce its rank-{f.s.numel()} truncation "
            f"only to {drift:.2e} (tolerance {rtol:.0e}); nothing written"
        )
    energy = float(matrix.square().sum())
    err = float(torch.linalg.matrix_norm(matrix - approx))
    kept = float(f.s.double().square().sum()) / energy if energy > 0 else 1.0
    return {"energy_kept": min(kept, 1.0), "relative_error": err / energy**0.5 if energy > 0 else 0.0}


def _write_factorized(
    plan: Plan, ranks: dict[str, int], ckpt: Checkpoint, config: EngineConfig, folder: Path,
    progress: ProgressCallback | None,
) -> list[dict[str, Any]]:  # fmt: skip
    # A matrix whose factors hold at least as many entries as itself stays dense.
    dense = {s.name for s in plan.specs if ranks[s.name] * (s.rows + s.cols) >= s.rows * s.cols}
    todo = [s for s in plan.specs if s.name not in dense]
    made = {f.spec.name: f for f in factors(CheckpointSource(ckpt, todo), ranks, config, progress=progress)}
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name in ckpt:
        if name in made:
            f = made[name]
            a_name, b_name = lowrank.factor_names(name)
            tensors[a_name], tensors[b_name] = _split(f, _torch_dtype(f.spec.dtype))
            layout[name] = {"shape": list(f.spec.shape), "dtype": f.spec.dtype, "rank": f.s.numel()}
        else:
            tensors[name] = ckpt[name]
    path = folder / lowrank.WEIGHTS_NAME
    lowrank.write_factorized(tensors, layout, path)
    del tensors
    rows = []
    with safe_open(str(path), "pt") as written:
        for spec in plan.specs:
            w = _exact_update(spec.name, ckpt, None)
            energy = float(w.square().sum())
            if spec.name in dense:
                if not torch.equal(written.get_tensor(spec.name), ckpt[spec.name]):
                    raise LowrankAuditError(f"{path}: tensor {spec.name!r} differs from {ckpt.path}")
                values = {"params_after": w.numel(), "energy_kept": 1.0, "relative_error": 0.0}
                rows.append(_row(spec.name, "dense", list(w.shape), **values, update_share=energy))
                continue
            a_name, b_name = lowrank.factor_names(spec.name)
            approx = written.get_tensor(b_name).double() @ written.get_tensor(a_name).double()
            values = _check_factors(spec.name, made[spec.name], approx, w, ckpt)
            rank = made[spec.name].s.numel()
            values |= {"rank": rank, "params_after": rank * (spec.rows + spec.cols)}
            rows.append(_row(spec.name, "factorized", list(w.shape), **values, update_share=energy))
        for name in ckpt:
            if name not in made and name not in dense and not torch.equal(written.get_tensor(name), ckpt[name]):
                raise LowrankAuditError(f"{path}: tensor {name!r} differs from {ckpt.path}")
    return rows


__all__ = ["COMPRESS_COLUMNS", "COMPRESS_SCHEMA", "REPORT_NAME", "compress"]
