"""The PEFT LoRA adapter format: tensor names and ``adapter_config.json``.

PEFT (0.x) saves an adapter as ``adapter_model.safetensors`` with every tensor under
``base_model.model.<module path>``: ``lora_A.weight`` [r, in] and ``lora_B.weight``
[out, r] for a Linear layer (``lora_B.bias`` [out] when ``lora_bias`` is set),
``lora_embedding_A`` [r, num_embeddings] and ``lora_embedding_B`` [dim, r] for an
Embedding, and the module's own parameter names for ``modules_to_save``. A LoRA layer adds
``lora_B(lora_A(x)) * lora_alpha / r``.

PEFT matches ``rank_pattern``/``alpha_pattern`` keys as regular expressions against the
end of a module path after a dot, so a full path with its dots escaped matches only that
module (``model.layers.1.`` cannot match ``model.layers.11.``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowrank_audit.errors import CheckpointError
from lowrank_audit.io.checkpoint import Checkpoint
from lowrank_audit.io.selection import MatrixSpec, select_matrices, wanted

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
EMBEDDINGS = ("save", "lora")
# Roles read as token embeddings and output heads: modules_to_save unless embeddings="lora".
EMBEDDING_ROLES = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in"})
HEAD_ROLES = frozenset({"lm_head", "embed_out"})


@dataclass(frozen=True)
class Plan:
    """What happens to each tensor: name -> treatment, and the matrices to factorize."""

    treatment: dict[str, str]
    specs: list[MatrixSpec]  # matrices to factorize, in name order


def module_of(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def plan_adapter(
    ckpt: Checkpoint, base: Checkpoint, *, embeddings: str, serving_safe: bool, include: Sequence[str],
    exclude: Sequence[str],
) -> Plan:  # fmt: skip
    """One treatment per changed tensor of ``ckpt - base`` (see :mod:`lowrank_audit.analyses.compress`).

    Raises:
        CheckpointError: A tensor exists on one side only: the update is undefined.
    """
    missing = [n for n in ckpt if n not in base]
    if missing:
        raise CheckpointError(f"{base.path}: base has no tensor {missing[0]!r} of {ckpt.path}; the update is undefined")
    extra = [n for n in base if n not in ckpt]
    if extra:
        raise CheckpointError(f"{ckpt.path}: fine-tune has no tensor {extra[0]!r} of base {base.path}")
    matrices = {s.name: s for s in select_matrices(ckpt, base=base).specs if len(s.shape) == 2}
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in ckpt:
        by_module[module_of(name)[0]].append(name)
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
            module = module_of(name)[0]
            treatment |= {n: "modules_to_save" for n in by_module[module]}
        warnings.warn(
            f"PEFT cannot combine lora_bias with embedding LoRA: {', '.join(moved)} saved whole "
            "(modules_to_save); exclude the bias deltas (-x '*.bias') to get embedding LoRA",
            stacklevel=3,
        )
    ckpt.release()
    base.release()
    specs = [matrices[n] for n, t in sorted(treatment.items()) if t in ("lora", "lora_embedding")]
    return Plan(treatment, specs)


def lora_names(module: str) -> tuple[str, str]:
    """Names of ``(A, B)`` for a Linear module."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def lora_bias_name(module: str) -> str:
    return f"{PREFIX}{module}.lora_B.bias"


def embedding_names(module: str) -> tuple[str, str]:
    """Names of ``(A, B)`` for an Embedding module."""
    return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"


def saved_name(tensor: str) -> str:
    """Name of a tensor of a ``modules_to_save`` module."""
    return f"{PREFIX}{tensor}"


def module_pattern(module: str) -> str:
    return re.escape(module)


def lora_config(
    ranks: dict[str, int], *, modules_to_save: Iterable[str] = (), lora_bias: bool = False
) -> dict[str, Any]:
    """``adapter_config.json`` for per-module ranks, with ``lora_alpha`` = r everywhere (scaling 1).

    ``r`` and ``lora_alpha`` are the most common rank; every module also has its rank in
    ``rank_pattern`` and ``alpha_pattern``, keyed by its escaped full path.
    """
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    patterns = {module_pattern(m): r for m, r in sorted(ranks.items())}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": common,
        "lora_alpha": common,
        "target_modules": sorted(ranks),
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "modules_to_save": sorted(modules_to_save) or None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def write_config(config: dict[str, Any], folder: Path) -> Path:
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def write_adapter(tensors: dict[str, torch.Tensor], config: dict[str, Any], folder: Path) -> None:
    save_file({k: t.contiguous() for k, t in tensors.items()}, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    write_config(config, folder)


__all__ = [
    "CONFIG_NAME",
    "EMBEDDINGS",
    "EMBEDDING_ROLES",
    "HEAD_ROLES",
    "Plan",
    "module_of",
    "plan_adapter",
    "PREFIX",
    "WEIGHTS_NAME",
    "embedding_names",
    "lora_bias_name",
    "lora_config",
    "lora_names",
    "module_pattern",
    "saved_name",
    "write_adapter",
    "write_config",
]
