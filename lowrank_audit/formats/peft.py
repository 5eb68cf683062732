"""The PEFT LoRA adapter format: tensor names and ``adapter_config.json``.

PEFT (0.x) saves an adapter as ``adapter_model.safetensors`` with every tensor under
``base_model.model.<module path>``: ``lora_A.weight`` [r, in] and ``lora_B.weight``
[out, r] for a Linear layer (``lora_B.bias`` [out] when ``lora_bias`` is set),
``lora_embedding_A`` [r, num_embeddings] and ``lora_embedding_B`` [dim, r] for an
Embedding, and the module's own parameter names for ``modules_to_save``. A LoRA layer adds
``lora_B(lora_A(x)) * lora_alpha / r``. With ``bias="lora_only"`` PEFT also saves the bias of
each LoRA layer's base layer, ``<module path>.base_layer.bias``, and loads it in place of the
base model's bias.

Bias deltas of LoRA layers take one of three forms (``bias``), measured with peft 0.21 on
the sample pair (``tests/test_peft_format.py``):

- ``fold`` (default): the fine-tuned bias as ``base_layer.bias`` with ``bias="lora_only"``.
  Loads, applies and merges (``merge_and_unload``) cleanly. PEFT loads one adapter with a
  bias per model, and ``disable_adapter``/``unload`` keep the fine-tuned biases.
- ``lora_bias``: the delta as ``lora_B.bias`` with ``lora_bias: true``. Loads and applies;
  ``merge_and_unload`` raises on the first LoRA layer whose base has no bias, after merging
  the layers before it and adding its weight delta: the model is left partly merged.
- ``leave_out``: not written; reported ``left_out`` with its share of the update.

PEFT matches ``rank_pattern``/``alpha_pattern`` keys as regular expressions against the
end of a module path after a dot, so a full path with its dots escaped and anchored by ``^``
matches only that module (``model.layers.1.`` cannot match ``model.layers.11.``, nor
``a.q`` the module ``z.a.q``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowrank_audit.errors import CheckpointError, OptionError
from lowrank_audit.io.checkpoint import Checkpoint, same_bits
from lowrank_audit.io.selection import MatrixSpec, select_matrices, wanted

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
EMBEDDINGS = ("save", "lora")
# Roles read as token embeddings and output heads: modules_to_save unless embeddings="lora".
EMBEDDING_ROLES = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in"})
HEAD_ROLES = frozenset({"lm_head", "embed_out"})
BIAS_MODES = ("fold", "lora_bias", "leave_out")
DEFAULT_BIAS = "fold"
# The report's treatment of a LoRA layer's bias delta under each mode.
BIAS_TREATMENTS = {"fold": "folded_bias", "lora_bias": "lora_bias", "leave_out": "left_out"}
# peft.TaskType's values (peft 0.21); tests/test_peft_format.py checks that they agree.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Hugging Face class-name endings (config.json "architectures") that name a PEFT task type.
# "ForConditionalGeneration" is also the ending of decoder-only vision-language models
# (LlavaForConditionalGeneration), so it means SEQ_2_SEQ_LM only with is_encoder_decoder.
ARCHITECTURE_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),  # GPT2LMHeadModel and other early causal LMs
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)
SEQ2SEQ_ENDINGS = ("ForConditionalGeneration", "ForSeq2SeqLM")


@dataclass(frozen=True)
class Plan:
    """What happens to each tensor: name -> treatment, and the matrices to factorize."""

    treatment: dict[str, str]
    specs: list[MatrixSpec]  # matrices to factorize, in name order
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json fields fixed by the plan


def module_of(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def check_options(*, bias: str, task_type: str | None) -> None:
    """Validate the adapter options that :func:`plan_adapter` takes from users.

    Raises:
        OptionError: ``bias`` is not one of :data:`BIAS_MODES`, or ``task_type`` is not a PEFT task type.
    """
    if bias not in BIAS_MODES:
        raise OptionError(f"bias must be one of {', '.join(BIAS_MODES)} but got {bias!r}")
    if task_type is not None and task_type not in TASK_TYPES:
        raise OptionError(f"task type must be one of PEFT's {', '.join(TASK_TYPES)} (or unset) but got {task_type!r}")


def plan_adapter(
    ckpt: Checkpoint, base: Checkpoint, *, embeddings: str, serving_safe: bool, include: Sequence[str],
    exclude: Sequence[str], bias: str = DEFAULT_BIAS, task_type: str | None = None,
) -> Plan:  # fmt: skip
    """One treatment per changed tensor of ``ckpt - base`` (see :mod:`lowrank_audit.analyses.compress`).

    ``bias`` chooses the treatment of a LoRA layer's bias delta (:data:`BIAS_TREATMENTS`);
    ``serving_safe`` leaves it out whatever ``bias`` says. The plan's ``config`` holds the
    ``adapter_config.json`` fields it fixes: ``bias``, ``base_model_name_or_path`` (``base.path``
    as given) and ``task_type`` (``task_type``, else read from the base folder's ``config.json``).

    Raises:
        CheckpointError: A tensor exists on one side only: the update is undefined.

    Warns:
        UserWarning: Bias deltas go into ``lora_bias`` while a LoRA layer has no bias in the
            base (PEFT cannot merge the adapter), or ``lora_bias`` meets embedding LoRA.
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
        changed = [n for n in names if not same_bits(ckpt[n], base[n])]
        if changed:
            skipped = {n for n in changed if not wanted(n, include, exclude)}
            kind = _module_kind(module, changed, skipped, matrices, embeddings=embeddings, serving_safe=serving_safe)
            if kind in ("lora", "lora_embedding"):
                own_bias = f"{module}.bias" if kind == "lora" and not serving_safe else None
                treatment[f"{module}.weight"] = kind
                for n in changed:
                    if n != f"{module}.weight":
                        treatment[n] = BIAS_TREATMENTS[bias] if n == own_bias and n not in skipped else "left_out"
            else:
                # PEFT loads a saved module with all its parameters, changed or not.
                treatment |= {n: kind for n in (names if kind == "modules_to_save" else changed)}
    if "lora_bias" in treatment.values():
        _save_embeddings_whole(treatment, by_module)
        _warn_unmergeable(treatment, base)
    ckpt.release()
    base.release()
    specs = [matrices[n] for n, t in sorted(treatment.items()) if t in ("lora", "lora_embedding")]
    config = {
        "bias": "lora_only" if "folded_bias" in treatment.values() else "none",
        "base_model_name_or_path": str(base.path),
        "task_type": task_type or read_task_type(base.path),
    }
    return Plan(treatment, specs, config)


def _module_kind(
    module: str, changed: list[str], skipped: set[str], matrices: dict[str, MatrixSpec], *, embeddings: str,
    serving_safe: bool,
) -> str:  # fmt: skip
    """The treatment of a module with changed tensors, decided by its weight."""
    role = module.rpartition(".")[2]
    weight = f"{module}.weight"
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
    return kind


def _save_embeddings_whole(treatment: dict[str, str], by_module: dict[str, list[str]]) -> None:
    """PEFT (0.21) refuses lora_bias on a model with Embedding LoRA; saving the embedding whole loses nothing."""
    moved = sorted(n for n, t in treatment.items() if t == "lora_embedding")
    if not moved:
        return
    for name in moved:
        treatment |= {n: "modules_to_save" for n in by_module[module_of(name)[0]]}
    warnings.warn(
        f"PEFT cannot combine lora_bias with embedding LoRA: {', '.join(moved)} saved whole "
        "(modules_to_save); exclude the bias deltas (-x '*.bias') to get embedding LoRA",
        stacklevel=4,
    )


def _warn_unmergeable(treatment: dict[str, str], base: Checkpoint) -> None:
    """PEFT's merge raises on a lora_bias layer without a base bias, after merging the layers before it."""
    lora_modules = (module_of(n)[0] for n, t in treatment.items() if t == "lora")
    bare = sorted(m for m in lora_modules if f"{m}.bias" not in base)
    if not bare:
        return
    warnings.warn(
        f"bias deltas go into lora_bias and {len(bare)} LoRA layers have no bias in the base ({bare[0]}, ...): "
        "PEFT loads and applies this adapter, but merge_and_unload() raises half-way and leaves the model "
        "partly merged; --bias fold writes the fine-tuned biases instead, which merge cleanly",
        stacklevel=4,
    )


def task_type_of(config: dict[str, Any]) -> str | None:
    """The PEFT task type a Hugging Face ``config.json`` implies, or None when it names none.

    Every class in ``architectures`` must end in the same task (:data:`ARCHITECTURE_TASKS`;
    ``...ForConditionalGeneration`` counts as ``SEQ_2_SEQ_LM`` only with ``is_encoder_decoder``).

    Example:
        >>> task_type_of({"architectures": ["LlamaForCausalLM"]})
        'CAUSAL_LM'
    """
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        return None
    tasks = set()
    for name in architectures:
        name = str(name)
        task = next((t for end, t in ARCHITECTURE_TASKS if name.endswith(end)), None)
        if task is None and name.endswith(SEQ2SEQ_ENDINGS) and config.get("is_encoder_decoder") is True:
            task = "SEQ_2_SEQ_LM"
        tasks.add(task)
    return tasks.pop() if len(tasks) == 1 else None


def read_task_type(path: Path) -> str | None:
    """The task type of the model folder ``path`` from its ``config.json``; None for a file or without one."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        warnings.warn(f"{config_path}: cannot read the model config ({exc}); task_type left unset", stacklevel=4)
        return None
    return task_type_of(config) if isinstance(config, dict) else None


def lora_names(module: str) -> tuple[str, str]:
    """Names of ``(A, B)`` for a Linear module."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def lora_bias_name(module: str) -> str:
    return f"{PREFIX}{module}.lora_B.bias"


def folded_bias_name(module: str) -> str:
    """Name of a LoRA layer's own (base layer) bias, saved with PEFT ``bias="lora_only"``."""
    return f"{PREFIX}{module}.base_layer.bias"


def embedding_names(module: str) -> tuple[str, str]:
    """Names of ``(A, B)`` for an Embedding module."""
    return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"


def saved_name(tensor: str) -> str:
    """Name of a tensor of a ``modules_to_save`` module."""
    return f"{PREFIX}{tensor}"


def module_pattern(module: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key matching exactly one module: PEFT matches
    ``(.*\\.)?(key)$``, so an unanchored ``a\\.q`` would also match ``z.a.q``."""
    return "^" + re.escape(module)


def lora_config(
    ranks: dict[str, int], *, modules_to_save: Iterable[str] = (), lora_bias: bool = False, bias: str = "none",
    base_model_name_or_path: str | None = None, task_type: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``adapter_config.json`` for per-module ranks, with ``lora_alpha`` = r everywhere (scaling 1).

    ``r`` and ``lora_alpha`` are the most common rank; every module also has its rank in
    ``rank_pattern`` and ``alpha_pattern``, keyed by its escaped full path. ``bias`` is PEFT's
    (``none`` or ``lora_only``: the adapter holds its LoRA layers' base biases).
    """
    # Ties go to the first module by name, whatever order the ranks were found in.
    common = Counter(r for _, r in sorted(ranks.items())).most_common(1)[0][0] if ranks else 8
    patterns = {module_pattern(m): r for m, r in sorted(ranks.items())}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": common,
        "lora_alpha": common,
        "target_modules": sorted(ranks),
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "lora_dropout": 0.0,
        "bias": bias,
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
    "ARCHITECTURE_TASKS",
    "BIAS_MODES",
    "BIAS_TREATMENTS",
    "CONFIG_NAME",
    "DEFAULT_BIAS",
    "EMBEDDINGS",
    "EMBEDDING_ROLES",
    "HEAD_ROLES",
    "Plan",
    "module_of",
    "plan_adapter",
    "PREFIX",
    "TASK_TYPES",
    "WEIGHTS_NAME",
    "check_options",
    "embedding_names",
    "folded_bias_name",
    "lora_bias_name",
    "lora_config",
    "lora_names",
    "module_pattern",
    "read_task_type",
    "saved_name",
    "task_type_of",
    "write_adapter",
    "write_config",
]
