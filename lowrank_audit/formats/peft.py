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
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


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
