"""``compress``: ranks -> factors -> files, verified after writing.

With a base, the update ΔW = W_ft - W_base becomes a PEFT LoRA adapter; without one, each
selected matrix W becomes two factors in a factorized checkpoint. Both run the same
steps: the rank policy (:mod:`lowrank_audit.ranks`) tells the engine what each matrix
needs, and one factor pass finds the top triplets (an energy target or a fixed rank needs
no spectrum pass first; a budget needs one), each matrix is split as B = U sqrt(S),
A = sqrt(S) Vh, the files are written to a temporary folder, then re-opened and checked
before the folder takes its final name.

Every tensor of a fine-tune that differs from its base gets exactly one treatment, shown
in the report's ``treatment`` column:

- ``lora``: 2-D weight of a Linear layer (and ``lm_head`` with ``embeddings="lora"``);
- ``folded_bias``: the bias of a LoRA layer whose bias changed, saved whole as its base
  layer's bias (PEFT ``bias="lora_only"``; ``bias="fold"``, the default);
- ``lora_bias``: the bias delta of a LoRA layer, as ``lora_B.bias`` (PEFT ``lora_bias``;
  ``bias="lora_bias"``);
- ``lora_embedding``: an embedding matrix with ``embeddings="lora"``;
- ``modules_to_save``: the whole fine-tuned module (embeddings and ``lm_head`` by default,
  norms, tensors with more than two dimensions);
- ``left_out``: not in the adapter, with its share of ||ΔW||^2 (``serving_safe``,
  ``exclude``, ``bias="leave_out"``), so nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from safetensors import safe_open

from lowrank_audit.analyses.calibration import (
    WhitenedSource,
    Whitening,
    calibration_plan,
    unwhitened,
)
from lowrank_audit.analyses.verification import (
    check_factors,
    exact_update,
    product,
    squared_norm,
    tensor_row,
    ticking,
    verify_adapter,
)
from lowrank_audit.distributed import World, current
from lowrank_audit.engine.batches import ProgressCallback
from lowrank_audit.engine.config import DEFAULT_MAX_BATCH_MB, DEFAULT_METHOD, EngineConfig
from lowrank_audit.engine.decompose import Factors, factors, nonfinite_refusal, spectra
from lowrank_audit.engine.needs import Need, RankNeed
from lowrank_audit.engine.sources import CheckpointSource, MatrixSource
from lowrank_audit.errors import LowrankAuditError, OptionError, VerificationError
from lowrank_audit.formats import lowrank, peft
from lowrank_audit.formats.peft import Plan, module_of
from lowrank_audit.formats.report import build_frame, schema_of, write_report
from lowrank_audit.io.adapters import detect
from lowrank_audit.io.checkpoint import Checkpoint, open_checkpoint, same_bits
from lowrank_audit.io.outputs import atomic_folder, check_target
from lowrank_audit.io.provenance import file_digest, hashing_inputs, merge_inputs, provenance
from lowrank_audit.io.selection import select_matrices
from lowrank_audit.ranks import LayerSpectrum, RankPolicy, allocate

REPORT_NAME = "compress-report.parquet"

COMPRESS_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("name", pa.string(), "tensor name in the checkpoint"),
    ("module", pa.string(), "module path"),
    ("treatment", pa.string(), "lora|folded_bias|lora_bias|lora_embedding|modules_to_save|left_out|factorized|dense"),
    ("rows", pa.int64(), "rows of the matrix (null for 1-D tensors)"),
    ("cols", pa.int64(), "columns of the matrix (null for 1-D tensors)"),
    ("rank", pa.int64(), "rank kept (null when not factorized)"),
    ("params_before", pa.int64(), "entries of the dense tensor"),
    ("params_after", pa.int64(), "entries written for it: r (m + n) for factors, all for saved, 0 left out"),
    ("energy_kept", pa.float64(), "share of ||W||_F^2 (or ||ΔW||_F^2) the written tensors hold"),
    ("relative_error", pa.float64(), "||W - written||_F / ||W||_F, measured on the written file"),
    ("update_share", pa.float64(), "share of the whole ||ΔW||_F^2 (or ||W||_F^2) in this tensor"),
    ("calibrated", pa.bool_(), "factored activation-aware (W S, --calibration); false: plain truncation"),
    ("damping", pa.float64(), "λ added to XᵀX as λ·mean(diag XᵀX) before its Cholesky factor S"),
    ("output_error", pa.float64(), "||(W - written) S||_F / ||W S||_F: the calibration outputs' relative error"),
)
COMPRESS_SCHEMA = schema_of(COMPRESS_COLUMNS)


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _plan_factorized(ckpt: Checkpoint, include: Sequence[str], exclude: Sequence[str]) -> Plan:
    specs = [s for s in select_matrices(ckpt, include=include, exclude=exclude).specs if len(s.shape) == 2]
    return Plan({s.name: "factorized" for s in specs}, specs)


def _need(
    plan: Plan, source: MatrixSource, policy: RankPolicy, config: EngineConfig, progress: ProgressCallback | None,
    world: World,
) -> Need:  # fmt: skip
    """What the factor pass must find for each matrix.

    A per-matrix policy (an energy target, a fixed rank) is its own need: the factor pass
    grows each sketch until the policy's rank is settled, and nothing runs before it. A
    budget spreads ranks across matrices, so it needs their spectra first: one spectrum
    pass (each process its share, every process gets them all), then the allocated ranks
    as fixed ones.
    """
    if policy.per_matrix:
        return policy.rank_for

    def spectra_share() -> list[LayerSpectrum]:
        found = []
        for result in spectra(source, config, progress=progress):
            if result.singular_values is None:
                raise LowrankAuditError(f"{source.path}: {nonfinite_refusal(result.spec.name, result.nonfinite)}")
            spec = result.spec
            found.append(LayerSpectrum(spec.name, spec.rows, spec.cols, result.singular_values, result.energy))
        return found

    layers = {layer.name: layer for part in world.gather(spectra_share) for layer in part}
    ordered = [layers[s.name] for s in plan.specs]
    return RankNeed({a.name: a.rank for a in (allocate(ordered, policy) if ordered else [])})


def _split(f: Factors, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``(A, B)``: B = U sqrt(S) [m, r], A = sqrt(S) Vh [r, n], in ``dtype``."""
    root = f.s.sqrt()
    return (root[:, None] * f.vh).to(dtype), (f.u * root).to(dtype)


def compress(
    path: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    policy: RankPolicy | None = None,
    embeddings: str = "save",
    serving_safe: bool = False,
    bias: str = peft.DEFAULT_BIAS,
    task_type: str | None = None,
    calibration: Sequence[str | Path] = (),
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
    """Write a PEFT LoRA adapter of ``path - base`` (with ``base``) or a factorized checkpoint;
    a LoRA adapter as ``path`` is resized in its own format (:func:`lowrank_audit.analyses.resize.resize`).

    Args:
        path: Fine-tuned checkpoint (with ``base``) or any checkpoint.
        out: Output folder: ``adapter_model.safetensors`` and ``adapter_config.json``, or
            ``model.safetensors``; ``compress-report.parquet`` beside them.
        base: Base checkpoint; its presence selects the adapter.
        policy: Rank choice (:class:`RankPolicy`); energy 0.95 when None. An energy
            target or a fixed rank runs one factor pass; a budget runs a spectrum pass first.
        embeddings: ``save`` (embeddings and lm_head as ``modules_to_save``) or ``lora``.
        serving_safe: Adapter with LoRA on Linear layers only: no ``modules_to_save``, no
            ``lora_bias``, no embedding or lm_head LoRA; the rest is reported ``left_out``.
        bias: The bias deltas of LoRA layers: ``fold`` (the fine-tuned bias saved as the
            layer's base bias, PEFT ``bias="lora_only"``; merges cleanly), ``lora_bias``
            (``lora_B.bias``; PEFT cannot merge it when a LoRA layer has no base bias, and
            a warning says so) or ``leave_out``.
        task_type: PEFT task type written to ``adapter_config.json`` (one of
            :data:`lowrank_audit.formats.peft.TASK_TYPES`); None reads it from the
            ``architectures`` of the base folder's ``config.json``, else leaves it null.
            ``base_model_name_or_path`` is ``base`` as given.
        calibration: Activation files (dumps or moments, :mod:`lowrank_audit.io.activations`)
            of the layers' inputs: each matrix whose module has rows there is truncated to
            keep its outputs, not its entries (:mod:`lowrank_audit.analyses.calibration`);
            energy targets then apply to the whitened spectrum (the outputs' energy). The
            others get plain truncation (``calibrated`` false in the report).
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
        VerificationError: The written files, re-read, do not reproduce a module's
            truncation (or a copied tensor) within the stored dtype's tolerance; the
            message names the module and the distance. Nothing is written then.
        LowrankAuditError: A matrix holds NaN/Inf. Nothing is written then.
    """
    if embeddings not in peft.EMBEDDINGS:
        raise OptionError(f"embeddings must be one of {', '.join(peft.EMBEDDINGS)} but got {embeddings!r}")
    peft.check_options(bias=bias, task_type=task_type)
    policy = policy or RankPolicy.create()
    if detect(path) is not None:  # a LoRA adapter: resized, in its own format
        given = {"--base": base is not None, "--calibration": bool(calibration), "--embeddings": embeddings != "save",
                 "--bias": bias != peft.DEFAULT_BIAS, "--task-type": task_type is not None,
                 "--serving-safe": serving_safe, "--method": method != DEFAULT_METHOD, "--device": device != "auto",
                 "--dtype": dtype != "float32", "--max-batch-mb": max_batch_mb != DEFAULT_MAX_BATCH_MB,
                 "--seed": seed != 0}  # fmt: skip
        if any(given.values()):
            options = ", ".join(k for k, v in given.items() if v)
            raise OptionError(f"{path} is a LoRA adapter, resized as it is: {options} apply to checkpoints")
        from lowrank_audit.analyses.resize import resize

        # Small (r x r cores): rank 0 resizes while the others wait, under torchrun.
        return current().on_main(lambda: resize(path, out, policy, include=include, exclude=exclude, force=force,
                                                command=command, progress=progress))  # fmt: skip
    config = EngineConfig.create(device=device, dtype=dtype, max_batch_mb=max_batch_mb, method=method, seed=seed)
    with ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(path))
        base_ckpt = stack.enter_context(open_checkpoint(base)) if base is not None else None
        inputs = [ckpt.path, *([base_ckpt.path] if base_ckpt else []), *map(Path, calibration)]
        out = check_target(out, inputs, force=force, folder=True)
        if base_ckpt is not None:
            plan = peft.plan_adapter(ckpt, base_ckpt, embeddings=embeddings, serving_safe=serving_safe,
                                     include=include, exclude=exclude, bias=bias, task_type=task_type)  # fmt: skip
        else:
            if serving_safe or embeddings != "save" or bias != peft.DEFAULT_BIAS or task_type is not None:
                raise OptionError("--serving-safe, --embeddings, --bias and --task-type apply to adapters: give --base")
            plan = _plan_factorized(ckpt, include, exclude)
        world = current()  # under torchrun: each process factors its share, rank 0 writes and verifies all
        share = world.share(plan.specs, config.cost)
        whitened = calibration_plan(calibration, plan.specs, ckpt.path, needed=None if world.main else share)
        digests = stack.enter_context(hashing_inputs(ckpt, base_ckpt, world=world))  # SHA-256 overlaps the engine
        source = WhitenedSource(CheckpointSource(ckpt, share, base_ckpt), whitened)
        need = _need(plan, source, policy, config, progress, world)

        def factor_share() -> tuple[list[Factors], dict[str, Any]]:
            return list(unwhitened(factors(source, need, config, progress=progress), whitened)), digests()

        parts = world.gather(factor_share, everywhere=False)  # factors travel to rank 0 only

        def write() -> pd.DataFrame:
            made = {f.spec.name: f for found, _ in parts for f in found}
            with atomic_folder(out, force=force) as tmp:
                try:
                    if base_ckpt is not None:
                        rows = _write_adapter(plan, made, whitened, ckpt, base_ckpt, tmp, progress)
                    else:
                        rows = _write_factorized(plan, made, whitened, ckpt, tmp, progress)
                except VerificationError as err:  # the temporary folder goes with it
                    raise VerificationError(f"{out}: {err}; nothing written") from err
                total = sum(r["update_share"] for r in rows)
                for r in rows:
                    r["update_share"] = r["update_share"] / total if total > 0 else 0.0
                metadata = provenance(
                    command=command or f"lowrank_audit.compress({str(path)!r}, {str(out)!r}, base={base!r})",
                    inputs=merge_inputs([d for _, d in parts])
                    | ({"calibration": [file_digest(Path(p)) for p in calibration]} if calibration else {}),
                    device=config.device_name,
                    policy=policy.describe(),
                    options={
                        "embeddings": embeddings,
                        "serving_safe": serving_safe,
                        "bias": bias,
                        "task_type": task_type,
                        "calibration": [str(p) for p in calibration],
                        "method": method,
                        "seed": seed,
                    },
                )
                frame = build_frame(rows, metadata, schema=COMPRESS_SCHEMA)
                write_report(frame, tmp / REPORT_NAME, schema=COMPRESS_SCHEMA)
            return frame

        frame = world.on_main(write)
    return frame


def _write_adapter(
    plan: Plan, made: dict[str, Factors], whitened: dict[str, Whitening], ckpt: Checkpoint, base: Checkpoint,
    folder: Path, progress: ProgressCallback | None,
) -> list[dict[str, Any]]:  # fmt: skip
    tensors: dict[str, torch.Tensor] = {}
    for f in made.values():
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
    lora_modules = {module_of(n)[0]: n for n, t in plan.treatment.items() if t in ("lora", "lora_embedding")}
    lora_bias = any(t == "lora_bias" for t in plan.treatment.values())
    saved = set()
    for name, treatment in sorted(plan.treatment.items()):
        if treatment == "lora_bias":
            tensors[peft.lora_bias_name(module_of(name)[0])] = ckpt[name] - base[name]
        elif treatment == "folded_bias":
            tensors[peft.folded_bias_name(module_of(name)[0])] = ckpt[name]
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
        {module_of(n)[0]: m.s.numel() for n, m in made.items()},
        modules_to_save=saved,
        lora_bias=lora_bias,
        **plan.config,
    )
    peft.write_adapter(tensors, config_json, folder)
    return verify_adapter(plan, made, whitened, ckpt, base, folder / peft.WEIGHTS_NAME, progress)


def _write_factorized(
    plan: Plan, made: dict[str, Factors], whitened: dict[str, Whitening], ckpt: Checkpoint, folder: Path,
    progress: ProgressCallback | None,
) -> list[dict[str, Any]]:  # fmt: skip
    # A matrix whose factors hold at least as many entries as itself stays dense.
    dense = {s.name for s in plan.specs if made[s.name].s.numel() * (s.rows + s.cols) >= s.rows * s.cols}
    made = {name: f for name, f in made.items() if name not in dense}
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
        for spec in ticking(plan.specs, progress):
            w = exact_update(spec.name, ckpt, None)
            energy = squared_norm(w)
            if spec.name in dense:
                if not same_bits(written.get_tensor(spec.name), ckpt[spec.name]):
                    raise VerificationError(f"tensor {spec.name!r} differs from {ckpt.path}")
                values = {"params_after": w.numel(), "energy_kept": 1.0, "relative_error": 0.0}
                rows.append(tensor_row(spec.name, "dense", list(w.shape), **values, update_share=energy))
                continue
            a_name, b_name = lowrank.factor_names(spec.name)
            approx = product(written.get_tensor(b_name), written.get_tensor(a_name))
            values = check_factors(f"tensor {spec.name!r}", made[spec.name], approx, w, energy, whitened.get(spec.name))
            rank = made[spec.name].s.numel()
            values |= {"rank": rank, "params_after": rank * (spec.rows + spec.cols)}
            rows.append(tensor_row(spec.name, "factorized", list(w.shape), **values, update_share=energy))
        for name in ckpt:
            if name not in made and name not in dense and not same_bits(written.get_tensor(name), ckpt[name]):
                raise VerificationError(f"tensor {name!r} differs from {ckpt.path}")
    return rows


__all__ = ["COMPRESS_COLUMNS", "COMPRESS_SCHEMA", "REPORT_NAME", "compress"]
