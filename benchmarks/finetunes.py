"""Base and fine-tune checkpoint pairs whose updates arise the way real ones do, for the benchmarks.

For every matrix of every layer (seeded, so the same arguments give the same pair):

1. a float32 base ``W0`` with entries N(0, 0.02^2), the scale of trained LLaMA weights;
2. an update direction ``U`` (:func:`decaying`): ``update_rank`` components with singular
   values near ``i**-alpha`` and random singular vectors, plus Gaussian noise holding
   ``noise_share`` of its energy;
3. a scale ``c`` for the update, either a fixed RMS (``delta_rms``) or such that the
   half-precision storage rounding holds ``floor_share`` of the stored update's energy
   (:func:`floor_scale`, from the expected rounding energy ``sum(ulp(x)**2 / 12)``);
4. ``base = W0`` stored in half precision and ``finetuned = (W0 + c U)`` stored in half
   precision. The audited update ``finetuned - base`` (taken in float32) is then
   ``c U`` plus the two roundings. With ``from_stored_base`` the fine-tune starts from
   the stored base instead (``finetuned = (half(W0) + c U)`` in half precision), so only
   its own rounding enters the update.

``benchmarks/compress.py`` (fixed RMS, from the stored base, fp16, with layer norms) and
``benchmarks/truncated.py`` (rounding share, from the float32 base, fp16 or bf16) write
their pairs with :func:`finetune_pair` and :func:`save_pair`. Import it with
``benchmarks/`` on ``sys.path``, as running a script from that folder does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LLAMA_ROLES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LLAMA_7B = {"hidden": 4096, "intermediate": 11008}


def llama_shapes(hidden: int, intermediate: int, roles: tuple[str, ...] = LLAMA_ROLES) -> dict[str, tuple[int, int]]:
    """LLaMA's projections per layer as (out, in) weight shapes, in the order of ``roles``."""
    shapes = {f"self_attn.{p}": (hidden, hidden) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes |= {"mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden)}
    shapes |= {"mlp.down_proj": (hidden, intermediate)}
    return {role: shapes[role] for role in roles}


def decaying(rows: int, cols: int, rank: int, alpha: float, noise_share: float, gen: torch.Generator) -> torch.Tensor:
    """A float32 (rows, cols) matrix: ``rank`` components with singular values near
    ``i**-alpha`` and random singular vectors, plus Gaussian noise holding ``noise_share``
    of the energy (not drawn when 0). Unscaled: the top singular value is about 1."""
    a = torch.randn(rows, rank, generator=gen) / rows**0.5
    b = torch.randn(cols, rank, generator=gen) / cols**0.5
    s = torch.arange(1, rank + 1, dtype=torch.float32) ** -alpha
    w = (a * s) @ b.T  # (rows, cols): spectrum near s, since a and b have nearly orthonormal columns
    if noise_share > 0:
        noise = torch.randn(rows, cols, generator=gen)
        noise *= (noise_share / (1 - noise_share) * w.square().sum() / noise.square().sum()) ** 0.5
        w += noise
    return w


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at ``|x|`` (float32): ``2**(e - m)`` with ``e`` the
    exponent of ``|x|`` (at least that of the smallest normal) and ``m`` the mantissa bits
    (fp16: 10, bf16: 7)."""
    info = torch.finfo(dtype)
    mantissa = round(-math.log2(info.eps))
    lowest = round(math.log2(info.tiny))  # exponent of the smallest normal; subnormals share its spacing
    _, e = torch.frexp(x)  # |x| = m * 2**e with 0.5 <= m < 1; e = 0 for x = 0
    exponent = torch.where(x == 0, lowest, torch.clamp(e - 1, min=lowest))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - mantissa)


def rounding_energy(x: torch.Tensor, dtype: torch.dtype) -> float:
    """Expected squared error of storing ``x`` in ``dtype``: ``sum(ulp(x)**2) / 12``,
    round-to-nearest errors being uniform on half an ulp either side."""
    u = ulp(x, dtype)
    return float(u.square().sum(dtype=torch.float64)) / 12


def floor_scale(
    start: torch.Tensor, u: torch.Tensor, dtype: torch.dtype, floor_share: float, *, start_rounds: bool
) -> tuple[float, float]:
    """The scale ``c`` for which rounding holds ``floor_share`` of the energy of the stored
    update ``half(start + c u) - half(start)``: with R the expected rounding energy,
    ``R / (c**2 ||u||**2 + R) = floor_share``. R counts the fine-tune's rounding, at
    ``|start + c u|``, and, when ``start_rounds`` (a float32 base), the base's at ``|start|``.
    R depends a little on c, so c is iterated to a fixed point. Returns (c, R)."""
    base_r = rounding_energy(start, dtype) if start_rounds else 0.0
    energy = float(u.square().sum(dtype=torch.float64))
    c = 0.0
    for _ in range(6):
        r = base_r + rounding_energy(start + c * u if c else start, dtype)
        new = math.sqrt(r * (1 - floor_share) / (floor_share * energy))
        done = abs(new - c) <= 1e-4 * new
        c = new
        if done:
            break
    return c, base_r + rounding_energy(start + c * u, dtype)


@dataclass
class Pair:
    """Two checkpoints' tensors and, with a rounding share asked, each matrix's figures."""

    base: dict[str, torch.Tensor] = field(default_factory=dict)
    finetuned: dict[str, torch.Tensor] = field(default_factory=dict)
    # name -> {"scale", "expected_share", "measured_share", "delta_rms"} (only with floor_share)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.base, self.finetuned) for t in d.values())


def finetune_pair(
    shapes: dict[str, tuple[int, int]],
    layers: int,
    *,
    update_rank: int = 256,
    alpha: float = 1.0,
    noise_share: float = 0.0,
    dtype: str = "float16",
    floor_share: float | None = None,
    delta_rms: float | None = None,
    from_stored_base: bool = False,
    norms: int = 0,
    seed: int = 0,
) -> Pair:
    """A base and fine-tune pair, named ``model.layers.{i}.{role}.weight``.

    Args:
        shapes: Role -> (out, in) weight shape, per layer (:func:`llama_shapes`).
        layers: Number of layers.
        update_rank, alpha, noise_share: The update direction (:func:`decaying`).
        dtype: Storage dtype of both checkpoints, ``float16`` or ``bfloat16``.
        floor_share: Scale each update so that storage rounding holds this share of its
            energy (:func:`floor_scale`). Exactly one of ``floor_share`` and ``delta_rms``.
        delta_rms: Scale each update direction to this RMS.
        from_stored_base: Fine-tune from the stored base rather than the float32 ``W0``.
        norms: With a width > 0, also two layer-norm vectors of that width per layer
            (ones in the base, 1 + N(0, 0.01^2) in the fine-tune).
        seed: Seed of the generator; the draws go matrix by matrix in ``shapes`` order.
    """
    if (floor_share is None) == (delta_rms is None):
        raise ValueError("give exactly one of floor_share and delta_rms")
    half = HALF[dtype]
    gen = torch.Generator().manual_seed(seed)
    pair = Pair()
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for role, (rows, cols) in shapes.items():
            name = prefix + role + ".weight"
            w0 = 0.02 * torch.randn(rows, cols, generator=gen)
            base = w0.to(half)
            start = base.float() if from_stored_base else w0
            u = decaying(rows, cols, update_rank, alpha, noise_share, gen)
            if delta_rms is not None:
                scale = delta_rms / u.square().mean().sqrt()  # a float32 0-d tensor
                ft = (start + u * scale).to(half)
            else:
                c, expected = floor_scale(start, u, half, floor_share, start_rounds=not from_stored_base)
                update = u * c
                ft = (start + update).to(half)
                delta = ft.float() - base.float()
                total = float(delta.square().sum(dtype=torch.float64))
                rounding = float((delta - update).square().sum(dtype=torch.float64))
                pair.stats[name] = {
                    "scale": c,
                    "expected_share": expected / (float(update.square().sum(dtype=torch.float64)) + expected),
                    "measured_share": rounding / total,
                    "delta_rms": math.sqrt(total / delta.numel()),
                }
            pair.base[name], pair.finetuned[name] = base, ft
        if norms:
            for norm in ("input_layernorm", "post_attention_layernorm"):
                pair.base[prefix + norm + ".weight"] = torch.ones(norms, dtype=half)
                pair.finetuned[prefix + norm + ".weight"] = (1 + 0.01 * torch.randn(norms, generator=gen)).to(half)
    return pair


def save_pair(pair: Pair, folder: Path) -> tuple[Path, Path]:
    """``folder/base.safetensors`` and ``folder/finetuned.safetensors``; returns (base, finetuned)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(pair.base, folder / "base.safetensors")
    save_file(pair.finetuned, folder / "finetuned.safetensors")
    return folder / "base.safetensors", folder / "finetuned.safetensors"
