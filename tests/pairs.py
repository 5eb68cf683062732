"""Base and fine-tune pairs with a known update spectrum, for the factor and compress tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.conftest import with_spectrum

# Two LLaMA-like roles, small: the smaller side (300) keeps `auto` exact, so tests choose
# `--method randomized` to exercise the sketch. EXACT_FRACTION * 300 = 75 columns at most.
SHAPES = {"mlp.up_proj": (400, 300), "mlp.down_proj": (300, 400)}
LAYERS = 2


def update_spectrum(side: int) -> torch.Tensor:
    """s_i = 0.05 * 0.9^i: k99.5 = 26, more than the first block of a factor sketch trusts
    (48 - 32 columns), and no gap near the ranks the tests ask for."""
    return 0.05 * 0.9 ** torch.arange(side, dtype=torch.float64)


def write_pair(folder: Path, *, unchanged: tuple[str, ...] = ()) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """``base.safetensors`` and ``finetuned.safetensors`` (float32) in ``folder``.

    Returns:
        The two paths and, by tensor name, the float64 singular values of the update
        ``ft - base`` as stored (zero for the names in ``unchanged``).
    """
    gen = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for layer in range(LAYERS):
        for i, (role, (rows, cols)) in enumerate(SHAPES.items()):
            name = f"model.layers.{layer}.{role}.weight"
            base[name] = (0.02 * torch.randn(rows, cols, generator=gen)).float()
            delta = with_spectrum(rows, cols, update_spectrum(min(rows, cols)), seed=10 * layer + i)
            ft[name] = base[name] if name in unchanged else (base[name].double() + delta).float()
    save_file(base, folder / "base.safetensors")
    save_file(ft, folder / "finetuned.safetensors")
    spectra = {n: np.linalg.svd((ft[n].double() - base[n].double()).numpy(), compute_uv=False) for n in ft}
    return folder / "base.safetensors", folder / "finetuned.safetensors", spectra


def truncation_error(s: np.ndarray, rank: int) -> float:
    """The exact rank-``rank`` truncation's relative error, from the float64 singular values ``s``."""
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))


def energy_rank_of(s: np.ndarray, target: float) -> int:
    """The exact energy rank, from the float64 singular values ``s``."""
    share = np.cumsum(s**2) / np.sum(s**2)
    return int(np.argmax(share >= target)) + 1
