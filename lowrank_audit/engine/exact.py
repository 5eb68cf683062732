"""Exact decompositions of a ``(b, m, n)`` stack (LAPACK on the CPU, cuSOLVER on CUDA)."""

from __future__ import annotations

import torch


def singular_values(batch: torch.Tensor) -> torch.Tensor:
    """Exact singular values of a ``(b, m, n)`` stack, descending, shape ``(b, min(m, n))``."""
    # W and W^T share singular values, and LAPACK's gesdd is about twice as fast on the
    # tall orientation of a row-major wide matrix (benchmarks/README.md).
    return torch.linalg.svdvals(batch.mT if batch.shape[-2] < batch.shape[-1] else batch)


def svd(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD ``U (b, m, k), S (b, k), Vh (b, k, n)`` of a stack, k = min(m, n)."""
    return torch.linalg.svd(batch, full_matrices=False)


__all__ = ["singular_values", "svd"]
