"""LoRA adapters as input: the update each module applies, ΔW = scale · B A, read from its factors.

Two formats, recognized by content wherever a checkpoint is accepted (:func:`detect`):

- **PEFT**: a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
  ``adapter_model.bin``, unpickled with ``weights_only=True``), tensors named
  ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
  (``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r] for an Embedding, whose
  update is (B A)ᵀ). Each module's rank and alpha come from ``rank_pattern``/``alpha_pattern``
  when a key matches its path (as PEFT matches them: the key as a regular expression against
  the end of the path after a dot), else ``r``/``lora_alpha``; the scale is alpha / r, or
  alpha / √r with ``use_rslora``. With ``fan_in_fan_out`` (GPT-2's Conv1D, whose weight is
  stored in × out) the update is (B A)ᵀ, as for an Embedding.
- **kohya**: one ``.safetensors`` file with ``<prefix>.lora_down.weight`` [r, in(, kh, kw)],
  ``<prefix>.lora_up.weight`` [out, r(, 1, 1)] and ``<prefix>.alpha`` (alpha = r when
  absent); the scale is alpha / r. A conv update is read as the out × (in·kh·kw) matrix,
  as conv weights are.

Other PEFT types (IA³, LoHa, ...), DoRA (PEFT's ``use_dora``, or a kohya/LyCORIS
``dora_scale``: it also rescales columns), LoRA on parameters (``target_parameters``) and
kohya's Tucker ``lora_mid`` are refused by name. A kohya alpha of 0 means alpha = r, as in
sd-scripts. Tensors that are not factors (``modules_to_save`` copies,
``lora_B.bias``) are listed as skipped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowrank_audit.errors import CheckpointError, NoMatricesSelected
from lowrank_audit.io.checkpoint import Checkpoint, open_checkpoint
from lowrank_audit.io.selection import MatrixSpec, parse_name, wanted

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_PEFT_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$|^(?P<emb>.+)\.(?P<ewhich>lora_embedding_[AB])$"
)
_KOHYA_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<which>lora_down|lora_up)\.weight$")
_LAYER = re.compile(r"(?:^|[._])(\d+)(?:[._]|$)")


@dataclass(frozen=True)
class LoraModule:
    """One module's factors: ΔW = scale · B A, with B [out, r] and A [r, in] as the file
    stores them (conv kernels flattened; an Embedding's update is (B A)ᵀ)."""

    module: str  # the module's path in the base model (PEFT) or the file's prefix (kohya)
    a: str  # tensor names in the file
    b: str
    rank: int  # declared r
    alpha: float
    scale: float
    shape: tuple[int, ...]  # the weight the update applies to: (out, in), (out, in, kh, kw) or (vocab, dim)
    transposed: bool = False  # Embedding LoRA, or fan_in_fan_out (Conv1D): ΔW = scale · (B A)ᵀ


@dataclass
class Adapter:
    """An opened adapter: its factors' file and one :class:`LoraModule` per module."""

    path: Path
    format: str  # "peft" or "kohya"
    weights: Checkpoint
    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why it is not a factor
    config_file: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file read, for provenance."""
        return ((self.config_file,) if self.config_file else ()) + self.weights.files

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` as stored (2-D views: conv kernels flattened), ΔW = scale · B A (transposed for embeddings)."""
        m = self.modules[module]
        b, a = self.weights[m.b], self.weights[m.a]
        return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW in float64, dense (for tests and small modules; the audit never forms it)."""
        m = self.modules[module]
        b, a = (t.double() for t in self.factors(module))
        product = m.scale * (b @ a)
        return product.T if m.transposed else product

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detect(path: str | Path) -> str | None:
    """``"peft"`` for a folder holding ``adapter_config.json`` (or a file inside one named
    ``adapter_model.*``), ``"kohya"`` for a ``.safetensors`` file of ``lora_down``/``lora_up``
    factors, None for anything else (a checkpoint)."""
    path = Path(path)
    if path.is_dir():
        return "peft" if (path / CONFIG).is_file() else None
    if path.name in WEIGHTS and (path.parent / CONFIG).is_file():
        return "peft"
    if path.suffix == ".safetensors" and path.is_file():
        from lowrank_audit.io.integrity import safetensors_header

        try:
            names = safetensors_header(path)
        except CheckpointError:
            return None  # the checkpoint reader says what is wrong with it
        if any(_KOHYA_FACTOR.match(n) for n in names):
            return "kohya"
    return None


def open_adapter(path: str | Path) -> Adapter:
    """Open a PEFT adapter folder or a kohya LoRA file (see the module docstring).

    Raises:
        CheckpointError: Neither format, an unsupported variant (DoRA, IA³, Tucker), a
            malformed config, or factors whose shapes disagree with each other or the config.
    """
    path = Path(path)
    kind = detect(path)
    if kind == "peft":
        return _open_peft(path if path.is_dir() else path.parent)
    if kind == "kohya":
        return _open_kohya(path)
    raise CheckpointError(
        f"{path}: not a LoRA adapter (a folder with {CONFIG}, or a .safetensors file of lora_down/lora_up factors)"
    )


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG
    try:
        config = json.loads(file.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable adapter config: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{file}: peft_type {kind!r} is not a LoRA adapter (only LORA updates are B A)")
    if config.get("target_parameters"):
        raise CheckpointError(f"{file}: LoRA on parameters (target_parameters, MoE experts) is not supported")
    if config.get("use_dora"):
        raise CheckpointError(f"{file}: DoRA also rescales each column, so its update is not B A; not supported")
    if not isinstance(config.get("r", 8), int) or not isinstance(config.get("lora_alpha", 8), (int, float)):
        raise CheckpointError(f"{file}: 'r' and 'lora_alpha' must be numbers")
    return config


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """A ``rank_pattern``/``alpha_pattern`` entry for ``module`` as PEFT finds it (the first key
    matching the end of the path after a dot), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _open_peft(folder: Path) -> Adapter:
    config = _read_config(folder)
    weights_file = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights_file is None:
        raise CheckpointError(f"{folder}: adapter folder without {' or '.join(WEIGHTS)}")
    weights = open_checkpoint(weights_file)
    factors: dict[str, dict[str, str]] = {}
    skipped = {}
    for name in weights:
        match = _PEFT_FACTOR.match(name)
        if match is None:
            skipped[name] = "not a LoRA factor (modules_to_save copy, bias or other)"
            continue
        module = (match["module"] or match["emb"]).removeprefix(PEFT_PREFIX)
        which = match["which"] or match["ewhich"]
        factors.setdefault(module, {})[which[-1]] = name
        if which.startswith("lora_embedding"):
            factors[module]["embedding"] = "1"
    modules = {}
    use_rslora = bool(config.get("use_rslora"))
    for module, found in sorted(factors.items()):
        if "A" not in found or "B" not in found:
            raise CheckpointError(f"{weights_file}: module {module!r} has lora_{'AB'['A' in found]} but not its pair")
        rank = int(pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
        # An Embedding's update, and a Conv1D's (fan_in_fan_out: GPT-2 stores weights in x out), is (B A)ᵀ.
        transposed = "embedding" in found or bool(config.get("fan_in_fan_out"))
        modules[module] = _module(weights, module, found["A"], found["B"], rank, alpha, use_rslora, transposed)
    return Adapter(folder, "peft", weights, modules, config, skipped, folder / CONFIG)


def _open_kohya(path: Path) -> Adapter:
    weights = open_checkpoint(path)
    factors: dict[str, dict[str, str]] = {}
    skipped = {}
    for name in weights:
        match = _KOHYA_FACTOR.match(name)
        if match:
            factors.setdefault(match["module"], {})[match["which"]] = name
        elif name.endswith(".lora_mid.weight"):
            raise CheckpointError(f"{path}: tensor {name!r}: Tucker-decomposed (lora_mid) LoRA is not supported")
        elif name.endswith(".dora_scale"):
            raise CheckpointError(f"{path}: tensor {name!r}: DoRA also rescales each column, so its update is not B A")
        elif not name.endswith(".alpha"):
            skipped[name] = "not a LoRA factor"
    modules = {}
    for module, found in sorted(factors.items()):
        if len(found) != 2:
            raise CheckpointError(f"{path}: module {module!r} lacks its lora_down or lora_up factor")
        rank = weights.info(found["lora_down"]).shape[0]
        alpha = float(weights[f"{module}.alpha"].item()) if f"{module}.alpha" in weights else 0.0
        alpha = alpha or float(rank)  # sd-scripts reads a missing or zero alpha as alpha = r (scale 1)
        modules[module] = _module(weights, module, found["lora_down"], found["lora_up"], rank, alpha, False, False)
    return Adapter(path, "kohya", weights, modules, {}, skipped)


def _module(
    weights: Checkpoint, module: str, a: str, b: str, rank: int, alpha: float, rslora: bool, transposed: bool
) -> LoraModule:
    """Check the factors' shapes against each other and the declared rank."""
    a_shape, b_shape = weights.info(a).shape, weights.info(b).shape
    where = f"{weights.path}: module {module!r}"
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1] or any(s != 1 for s in b_shape[2:]):
        raise CheckpointError(f"{where}: factors {list(a_shape)} (A) and {list(b_shape)} (B) do not multiply")
    if transposed and len(a_shape) != 2:
        raise CheckpointError(f"{where}: a transposed update (Embedding, fan_in_fan_out) needs 2-D factors")
    shape = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], *a_shape[1:])
    if a_shape[0] != rank:
        raise CheckpointError(f"{where}: its factors have rank {a_shape[0]} but the config declares {rank}")
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    return LoraModule(module, a, b, rank, alpha, scale, shape, transposed)


_KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lora_")


def base_tensor(adapter: Adapter, module: str, base: Checkpoint) -> str:
    """The base tensor a module's update applies to: ``<module>.weight`` (PEFT), or for a kohya
    name the base weight whose dotted path, with dots as underscores, follows its prefix.

    Raises:
        CheckpointError: No such tensor in ``base``.
    """
    if adapter.format == "peft":
        name = f"{module}.weight"
        if name in base:
            return name
    else:
        flat = {n.removesuffix(".weight").replace(".", "_"): n for n in base if n.endswith(".weight")}
        for prefix in _KOHYA_PREFIXES:
            if module.startswith(prefix) and module.removeprefix(prefix) in flat:
                return flat[module.removeprefix(prefix)]
    raise CheckpointError(f"{base.path}: no base weight for the adapter's module {module!r}")


def adapter_specs(
    adapter: Adapter, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> tuple[tuple[MatrixSpec, ...], dict[str, str]]:
    """One spec per module (globs on module paths), and the skipped tensors with reasons.

    The engine decomposes each update through its r × r core (:class:`AdapterSource`), so
    a spec's ``rows``/``cols`` are the core's and ``audited`` the update's out × in.

    Raises:
        NoMatricesSelected: No module is left.
    """
    specs = []
    for name, m in adapter.modules.items():
        if not wanted(name, include, exclude):
            continue
        rows = m.shape[0]
        cols = math.prod(m.shape[1:])
        core = (min(rows, m.rank), min(cols, m.rank))
        module, role, layer = parse_name(name)
        if layer is None and (found := _LAYER.search(name)):  # kohya: lora_unet_..._3_attn
            layer = int(found[1])
        dtype = adapter.weights.info(m.a).dtype
        spec = MatrixSpec(name, module, role, layer, "adapter", m.shape, dtype, *core, 1, audited=(rows, cols))
        specs.append(spec)
    if not specs:
        hint = " with these --include/--exclude patterns" if include or exclude else ""
        raise NoMatricesSelected(f"{adapter.path}: no LoRA module to audit{hint}")
    return tuple(specs), dict(adapter.skipped)


def balance(b: torch.Tensor, a: torch.Tensor) -> dict[str, float]:
    """Factor balance of B A as stored: ‖B‖_F / ‖A‖_F, and ‖BᵀB − AAᵀ‖_F / (‖B‖_F ‖A‖_F),
    which gradient flow on the factors conserves (its numerator; the ratio moves with the norms)."""
    b, a = b.double(), a.double()
    nb, na = float(torch.linalg.norm(b)), float(torch.linalg.norm(a))
    gap = float(torch.linalg.norm(b.T @ b - a @ a.T))
    return {
        "factor_norm_ratio": nb / na if na > 0 else math.inf,
        "factor_imbalance": gap / (nb * na) if nb * na > 0 else None,
    }


def factorize(b: torch.Tensor, a: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q_B, C, Q_A)`` with scale · B A = Q_B C Q_Aᵀ: B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR,
    in float64), C = scale · R_B R_Aᵀ the r × r core, Q_B and Q_A orthonormal, so σ(C) = σ(scale · B A)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    return qb, scale * (rb @ ra.T), qa


def core(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """The r × r core of scale · B A (:func:`factorize`): its singular values are the update's."""
    return factorize(b, a, scale)[1]


__all__ = ["Adapter", "LoraModule", "adapter_specs", "balance", "base_tensor", "core", "detect", "factorize",
           "open_adapter", "pattern_value"]  # fmt: skip
