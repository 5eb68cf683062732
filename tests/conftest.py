"""Shared fixtures and the numeric tolerances every test uses (defined here only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"

# Singular values are backward stable: |s_i - s_ref_i| <= c * eps * s_1. These absolute
# tolerances, relative to the largest singular value, leave c about 40 for float32 and
# 5000 for float64 (random 300x300 matrices reach c of about 4 and 70).
SV_ATOL = {torch.float32: 5e-6, torch.float64: 1e-12}
# Randomized top-k (q = 2 power iterations, p = 10) on the power-law spectrum s_i = 1/i,
# k = 64: errors of 6e-4 to 7e-4 of s_1 measured, 5e-3 with q = 0 (the negative control).
RANDOMIZED_ATOL = 1.5e-3


def reference_singular_values(matrix: np.ndarray | torch.Tensor) -> np.ndarray:
    """The float64 NumPy reference every engine figure is compared with."""
    m = matrix.double().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, dtype=np.float64)
    return np.linalg.svd(m, compute_uv=False)


def assert_singular_values_close(got: np.ndarray, want: np.ndarray, dtype: torch.dtype) -> None:
    """Absolute error within ``SV_ATOL[dtype] * s_1`` for every singular value."""
    assert got.shape == want.shape
    scale = max(float(want[0]), np.finfo(np.float64).tiny) if len(want) else 1.0
    err = float(np.max(np.abs(got - want))) / scale if len(want) else 0.0
    assert err <= SV_ATOL[dtype], f"max |s - s_ref| / s_1 = {err:.3g} > {SV_ATOL[dtype]:.1g}"


def reference_energy_rank(s: np.ndarray, target: float, dtype: torch.dtype) -> tuple[int, float, float]:
    """Reference rank, the energy curve's distance from the threshold there, and the most
    that singular values within tolerance can move the curve (first order: 2 s_i ds_i)."""
    share = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(share >= target)) + 1
    margin = min(abs(share[k - 1] - target), abs(share[k - 2] - target) if k > 1 else 1.0)
    wobble = 2 * SV_ATOL[dtype] * s[0] * np.sum(s) / np.sum(s**2)
    return k, margin, wobble


def low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    """``U diag(s) V^T + noise * G`` in float64 with s = 10, 5, 2.5, ... (a decaying spectrum)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen, dtype=torch.float64))
    s = 10.0 * 0.5 ** torch.arange(rank, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T + noise * torch.randn(rows, cols, generator=gen, dtype=torch.float64)


class RunsCode:
    """A pickle payload that creates a folder when unpickled without ``weights_only``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def with_spectrum(rows: int, cols: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """``U diag(s) V^T`` in float64 with random orthonormal U, V: an exactly known spectrum."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=gen, dtype=torch.float64))
    return (u * s.double()) @ v.T


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES
