"""``compress`` and ``expand``: spectra -> ranks -> factors -> files, verified after writing.

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
import os
import shutil
import warnings
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_audit import __version__
from lowrank_audit.checkpoint import Checkpoint, open_checkpoint
from lowrank_audit.errors import CheckpointError, LowrankAuditError, OptionError
from lowrank_audit.formats import lowrank, peft
from lowrank_audit.ranks import LayerSpectrum, RankPolicy, allocate
from lowrank_audit.report import (
    atomic_path,
    build_frame,
    check_output_path,
    file_digest,
    refuse_overwriting_inputs,
    schema_of,
    write_report,
)
from lowrank_audit.selection import MatrixSpec, select_matrices, wanted
from lowrank_audit.svd import DEFAULT_MAX_BATCH_MB, EngineConfig, Factors, factors, spectra

REPORT_NAME = "compress-report.parquet"
EMBEDDINGS = ("save", "lora")
# Roles read as token embeddings and output heads: modules_to_save unless embeddings="lora".
EMBEDDING_ROLES = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in"})
HEAD_ROLES = frozenset({"lm_head", "embed_out"})
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


@dataclass(frozen=True)
class _Plan:
    """What happens to each tensor: name -> treatment, and the matrices to factorize."""

    treatment: dict[str, str]
    specs: list[MatrixSpec]  # matrices to factorize, in name order


def _module(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _prepare_out(out: Path, inputs: Sequence[Path], force: bool) -> Path:
    """A fresh temporary folder beside ``out``, after refusing outputs that clash with inputs."""
    refuse_overwriting_inputs(out, inputs)
    if out.exists() and not force:
        raise OptionError(f"output folder {out} exists; use --force to replace it")
    if out.exists() and not out.is_dir():
        raise OptionError(f"output {out} is a file; --out takes a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Give the verified folder its final name; an old one (``--force``) goes only afterwards."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _plan_adapter(
    ckpt: Checkpoint, base: Checkpoint, *, embeddings: str, serving_safe: bool, include: Sequence[str],
    exclude: Sequence[str],
) -> _Plan:  # fmt: skip
    missing = [n for n in ckpt if n not in base]
    if missing:
        raise CheckpointError(f"{base.path}: base has no tensor {missing[0]!r} of {ckpt.path}; the update is undefined")
    extra = [n for n in base if n not in ckpt]
    if extra:
        raise CheckpointError(f"{ckpt.path}: fine-tune has no tensor {extra[0]!r} of base {base.path}")
    matrices = {s.name: s for s in select_matrices(ckpt, base=base).specs if len(s.shape) == 2}
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in ckpt:
        by_module[_module(name)[0]].append(name)
    treatment: dict[str, str] = {}
    for module, names in sorted(by_module.items()):
        changed = [n for n in names if not torch.equal(ckpt[n], base[n])]
        if not changed:
            continue
        role = module.rpartition(".")[2]
        weight = f"{module}.weight"
        skipped = {n for n in changed if not wanted(n, include, exclude)}
        if weight in skipped:
            kind = "left_out"
        elif weight in changed and weight in matrices and role not in EMBEDDING_ROLES | HEAD_ROLES:
            kind = "lora"
        elif weight in changed and weight in matrices and embeddings == "lora":
            kind = "lora_embedding" if role in EMBEDDING_ROLES else "lora"
        else:
            kind = "modules_to_save"
        if serving_safe and (kind == "modules_to_save" or role in EMBEDDING_ROLES | HEAD_ROLES):
            kind = "left_out"
        if kind == "modules_to_save" and skipped:
            kind = "left_out"  # a saved module is written whole or not at all
        if kind in ("lora", "lora_embedding"):
            treatment[weight] = kind
            for n in changed:
                if n != weight:
                    lora_bias = n == f"{module}.bias" and kind == "lora" and not serving_safe and n not in skipped
                    treatment[n] = "lora_bias" if lora_bias else "left_out"
        else:
            # PEFT loads a saved module with all its parameters, changed or not.
            treatment |= {n: kind for n in (names if kind == "modules_to_save" else changed)}
    if "lora_bias" in treatment.values() and "lora_embedding" in treatment.values():
        # PEFT (0.21) refuses lora_bias on a model with Embedding LoRA; saving the embedding
        # whole loses nothing.
        moved = sorted(n for n, t in treatment.items() if t == "lora_embedding")
        for name in moved:
            module = _module(name)[0]
            treatment |= {n: "modules_to_save" for n in by_module[module]}
        warnings.warn(
            f"PEFT cannot combine lora_bias with embedding LoRA: {', '.join(moved)} saved whole "
            "(modules_to_save); exclude the bias deltas (-x '*.bias') to get embedding LoRA",
            stacklevel=3,
        )
    ckpt.release()
    base.release()
    specs = [matrices[n] for n, t in sorted(treatment.items()) if t in ("lora", "lora_embedding")]
    return _Plan(treatment, specs)


def _plan_factorized(ckpt: Checkpoint, include: Sequence[str], exclude: Sequence[str]) -> _Plan:
    specs = [s for s in select_matrices(ckpt, include=include, exclude=exclude).specs if len(s.shape) == 2]
    return _Plan({s.name: "factorized" for s in specs}, specs)


def _ranks(
    plan: _Plan, ckpt: Checkpoint, base: Checkpoint | None, policy: RankPolicy, config: EngineConfig
) -> tuple[dict[str, int], dict[str, float]]:
    """Ranks by the policy, from the engine's spectra; and each matrix's ||W||_F^2."""
    layers: dict[str, LayerSpectrum] = {}
    for result in spectra(plan.specs, ckpt, base=base, config=config):
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
    method: str = "auto",
    seed: int = 0,
    command: str | None = None,
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
    if embeddings not in EMBEDDINGS:
        raise OptionError(f"embeddings must be one of {', '.join(EMBEDDINGS)} but got {embeddings!r}")
    policy = policy or RankPolicy.create()
    config = EngineConfig.create(device=device, dtype=dtype, max_batch_mb=max_batch_mb, method=method, seed=seed)
    out = Path(out)
    with ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(path))
        base_ckpt = stack.enter_context(open_checkpoint(base)) if base is not None else None
        inputs = [ckpt.path, *([base_ckpt.path] if base_ckpt is not None else [])]
        if base_ckpt is not None:
            plan = _plan_adapter(ckpt, base_ckpt, embeddings=embeddings, serving_safe=serving_safe,
                                 include=include, exclude=exclude)  # fmt: skip
        else:
            if serving_safe or embeddings != "save":
                raise OptionError("--serving-safe and --embeddings apply to adapters: give --base")
            plan = _plan_factorized(ckpt, include, exclude)
        ranks, energies = _ranks(plan, ckpt, base_ckpt, policy, config)
        tmp = _prepare_out(out, inputs, force)
        try:
            if base_ckpt is not None:
                rows = _write_adapter(plan, ranks, ckpt, base_ckpt, config, tmp)
            else:
                rows = _write_factorized(plan, ranks, ckpt, config, tmp)
            total = sum(r["update_share"] for r in rows)
            for r in rows:
                r["update_share"] = r["update_share"] / total if total > 0 else 0.0
            metadata = {
                "tool_version": __version__,
                "command": command or f"lowrank_audit.compress({str(path)!r}, {str(out)!r}, base={base!r})",
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "inputs": {"checkpoint": {"path": str(ckpt.path), "files": [file_digest(f) for f in ckpt.files]}}
                | ({"base": {"path": str(base_ckpt.path)}} if base_ckpt is not None else {}),
                "policy": policy.describe(),
                "options": {"embeddings": embeddings, "serving_safe": serving_safe, "method": method, "seed": seed},
            }
            frame = build_frame(rows, metadata, schema=COMPRESS_SCHEMA)
            write_report(frame, tmp / REPORT_NAME, schema=COMPRESS_SCHEMA)
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return frame


def _row(name: str, treatment: str, shape: Sequence[int], **values: Any) -> dict[str, Any]:
    matrix = len(shape) == 2
    row = {
        "name": name,
        "module": _module(name)[0],
        "treatment": treatment,
        "rows": shape[0] if matrix else None,
        "cols": shape[1] if matrix else None,
        "rank": None,
        "params_before": math.prod(shape),
    }
    return row | values


def _write_adapter(
    plan: _Plan, ranks: dict[str, int], ckpt: Checkpoint, base: Checkpoint, config: EngineConfig, folder: Path
) -> list[dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    made: dict[str, Factors] = {}
    for f in factors(plan.specs, ckpt, base=base, ranks=ranks, config=config):
        name = f.spec.name
        module = _module(name)[0]
        a, b = _split(f, _torch_dtype(f.spec.dtype))
        if plan.treatment[name] == "lora_embedding":
            # PEFT's Embedding adds (one_hot(x) @ A^T) @ B^T: A^T = U sqrt(S), B^T = sqrt(S) Vh.
            names = peft.embedding_names(module)
            tensors[names[0]], tensors[names[1]] = b.T, a.T
        else:
            names = peft.lora_names(module)
            tensors[names[0]], tensors[names[1]] = a, b
        made[name] = f
    lora_modules = {_module(n)[0]: n for n, t in plan.treatment.items() if t in ("lora", "lora_embedding")}
    lora_bias = any(t == "lora_bias" for t in plan.treatment.values())
    saved = set()
    for name, treatment in sorted(plan.treatment.items()):
        if treatment == "lora_bias":
            tensors[peft.lora_bias_name(_module(name)[0])] = ckpt[name] - base[name]
        elif treatment == "modules_to_save":
            tensors[peft.saved_name(name)] = ckpt[name]
            saved.add(_module(name)[0])
    if lora_bias:
        # PEFT gives every LoRA layer a bias once lora_bias is set: zero where nothing changed.
        for module, weight in lora_modules.items():
            if plan.treatment[weight] == "lora":
                rows = ckpt.info(weight).shape[0]
                tensors.setdefault(
                    peft.lora_bias_name(module), torch.zeros(rows, dtype=_torch_dtype(made[weight].spec.dtype))
                )
    config_json = peft.lora_config({_module(n)[0]: ranks[n] for n in made}, modules_to_save=saved, lora_bias=lora_bias)
    peft.write_adapter(tensors, config_json, folder)
    return _verify_adapter(plan, made, ckpt, base, folder / peft.WEIGHTS_NAME)


def _verify_adapter(
    plan: _Plan, made: dict[str, Factors], ckpt: Checkpoint, base: Checkpoint, written: Path
) -> list[dict[str, Any]]:
    """Re-open the adapter and measure each tensor against the update it stands for."""
    rows = []
    with safe_open(str(written), "pt") as adapter:
        for name, treatment in sorted(plan.treatment.items()):
            delta = _exact_update(name, ckpt, base)
            energy = float(delta.square().sum())
            shape = list(delta.shape)
            module = _module(name)[0]
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
    plan: _Plan, ranks: dict[str, int], ckpt: Checkpoint, config: EngineConfig, folder: Path
) -> list[dict[str, Any]]:
    # A matrix whose factors hold at least as many entries as itself stays dense.
    dense = {s.name for s in plan.specs if ranks[s.name] * (s.rows + s.cols) >= s.rows * s.cols}
    todo = [s for s in plan.specs if s.name not in dense]
    made = {f.spec.name: f for f in factors(todo, ckpt, ranks=ranks, config=config)}
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


def expand(path: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Multiply a factorized checkpoint back into a dense safetensors file.

    Args:
        path: A folder written by :func:`compress` without base, or its ``model.safetensors``.
        out: The dense ``.safetensors`` file: original names, shapes and dtypes; every
            tensor that was not factorized is copied unchanged.
        force: Replace an existing ``out``.

    Raises:
        CheckpointError: ``path`` is not a factorized checkpoint.
        OptionError: ``out`` exists without ``force``, or is the input.
    """
    path, out = Path(path), Path(out)
    source = path / lowrank.WEIGHTS_NAME if path.is_dir() else path
    if not source.exists():
        raise CheckpointError(f"{source}: no such file")
    check_output_path(out, [path, source])
    if out.exists() and not force:
        raise OptionError(f"output {out} exists; use --force to replace it")
    layout = lowrank.layout(source)
    factor_of = {n: name for name in layout for n in lowrank.factor_names(name)}
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(source), "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if name in factor_of:
                matrix = factor_of[name]
                if matrix not in tensors:
                    a_name, b_name = lowrank.factor_names(matrix)
                    tensors[matrix] = lowrank.dense(f.get_tensor(a_name), f.get_tensor(b_name), layout[matrix])
            else:
                tensors[name] = f.get_tensor(name)
    with atomic_path(out) as tmp:
        save_file(dict(sorted(tensors.items())), tmp, metadata={"format": "pt"})
    return out


__all__ = ["COMPRESS_COLUMNS", "COMPRESS_SCHEMA", "REPORT_NAME", "compress", "expand"]
