"""Exact decompositions of a ``(b, m, n)`` stack (LAPACK on the CPU, cuSOLVER on CUDA)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lowrank_audit.bounds import Tail

RankOf = Callable[[np.ndarray], int | None]  # one matrix's need, given its top values known (float64)


@dataclass(frozen=True)
class Triplets:
    """One matrix's top singular triplets.

    ``s`` holds every value computed with confidence (descending), at least ``rank`` of
    them; ``u`` (m, rank) and ``vh`` (rank, n) are the vectors of the first ``rank`` when
    vectors were asked for, else None. ``tail`` is what a randomized sketch proves about
    the values it did not compute (None when exact, or when not asked for).
    """

    s: torch.Tensor
    rank: int
    u: torch.Tensor | None
    vh: torch.Tensor | None
    method: str  # exact or randomized
    tail: Tail | None = None


def singular_values(batch: torch.Tensor) -> torch.Tensor:
    """Exact singular values of a ``(b, m, n)`` stack, descending, shape ``(b, min(m, n))``."""
    # W and W^T share singular values, and LAPACK's gesdd is about twice as fast on the
    # tall orientation of a row-major wide matrix (benchmarks/README.md).
    return torch.linalg.svdvals(batch.mT if batch.shape[-2] < batch.shape[-1] else batch)


def svd(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD ``U (b, m, k), S (b, k), Vh (b, k, n)`` of a stack, k = min(m, n)."""
    if batch.shape[-2] < batch.shape[-1]:
        # As for the values, the tall orientation is the faster one: W^T = U' S Vh' gives
        # W = Vh'^T S U'^T.
        u_t, s, vh_t = torch.linalg.svd(batch.mT, full_matrices=False)
        return vh_t.mT, s, u_t.mT
    return torch.linalg.svd(batch, full_matrices=False)


def exact_triplets(batch: torch.Tensor, rank_of: Sequence[RankOf], *, vectors: bool) -> list[Triplets]:
    """Every singular value of each matrix, and the vectors of the rank each needs."""
    u, s, vh = svd(batch) if vectors else (None, singular_values(batch), None)
    out = []
    for i, need in enumerate(rank_of):
        rank = need(s[i].double().cpu().numpy())
        rank = s.shape[-1] if rank is None else min(rank, s.shape[-1])
        if vectors:
            out.append(Triplets(s[i], rank, u[i, :, :rank], vh[i, :rank], "exact"))
        else:
            out.append(Triplets(s[i], rank, None, None, "exact"))
    return out


def gram_triplets(batch: torch.Tensor, sides: Sequence[int]) -> list[Triplets]:
    """Singular values of each X from its Gram matrix G = XᵀX, a ``(b, d, d)`` float64 stack.

    σᵢ(X) = sqrt(λᵢ(G)): symmetric eigenvalues in float64 are exact to about eps·λ₁, so each
    σᵢ is within about sqrt(eps)·σ₁ = 1.5e-8·σ₁ of the SVD of X itself (tests state 1e-6).
    ``sides[i]`` = min(N, d) of the i-th X: a Gram of N < d rows has only N values.
    """
    values = torch.linalg.eigvalsh(batch.double()).flip(-1).clamp_min(0).sqrt()  # (b, d), descending
    return [Triplets(values[i, :side], side, None, None, "exact") for i, side in enumerate(sides)]


def flip_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U (m, r)`` and ``Vh (r, n)`` with each pair's sign fixed: the largest-magnitude entry of
    every column of U is positive (scikit-learn's ``svd_flip``, U-based).

    A singular pair is defined up to a sign shared by u_i and v_i; fixing it makes factors a
    function of the matrix alone, so exact and randomized runs, and reruns, agree.
    """
    if u.shape[-1] == 0:
        return u, vh
    top = u.abs().argmax(dim=-2, keepdim=True)  # (1, r): first index on a tie
    signs = torch.sign(torch.gather(u, -2, top))  # (1, r)
    signs[signs == 0] = 1
    return u * signs, vh * signs.mT


__all__ = ["RankOf", "Triplets", "exact_triplets", "flip_signs", "gram_triplets", "singular_values", "svd"]
