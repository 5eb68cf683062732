"""Where an update departs from its base: principal angles and intruder dimensions.

For a matrix W₀ of the base and the update ΔW applied to it (a fine-tune's W − W₀, or a
LoRA module's scale · B A), both in float64:

- ``base_angle``: the largest principal angle, in degrees, between the update's top-r left
  singular subspace and the base's top-r left singular subspace, r the update's k95 (its
  95 % energy rank; the computed values where that is not known). Near 0°: the update acts
  inside the directions the base already uses most; near 90°: in directions it did not.
- ``intruder_dimensions`` (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence", arXiv 2410.21228): of the top :data:`INTRUDER_TOP` left singular vectors of
  W₀ + ΔW, how many have cosine similarity below :data:`INTRUDER_THRESHOLD` with every left
  singular vector of W₀. The paper reports these for the top 10 vectors and sweeps the
  threshold; 0.5 is ours.

Both need exact SVDs of W₀ and W₀ + ΔW (and of ΔW): three per matrix, computed only when
asked (``spectrum --alignment``; implied for an adapter with ``--base``).
"""

from __future__ import annotations

import math

import torch

INTRUDER_TOP = 10
INTRUDER_THRESHOLD = 0.5


def largest_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Degrees between the column spaces of ``a`` and ``b`` (orthonormal columns, as many each):
    the largest principal angle, from its sine when it is small (arccos of a cosine near 1
    would turn a rounding of 1e-16 into 1e-6 degrees) and from its cosine otherwise."""
    m = a.T @ b
    cos = float(torch.linalg.svdvals(m).min().clamp(max=1.0))
    if cos < math.sqrt(0.5):
        return math.degrees(math.acos(cos))
    sin = float(torch.linalg.svdvals(b - a @ m).max().clamp(max=1.0))
    return math.degrees(math.asin(sin))


def alignment(base: torch.Tensor, update: torch.Tensor, rank: int | None) -> dict[str, float | int | None]:
    """``base_angle`` and ``intruder_dimensions`` of ``update`` applied to ``base`` (same 2-D shape)."""
    w0, delta = base.double(), update.double()
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]
    angle = None
    if rank and torch.any(delta != 0):
        ud = torch.linalg.svd(delta, full_matrices=False)[0]
        r = min(rank, ud.shape[1], u0.shape[1])
        angle = largest_principal_angle(ud[:, :r], u0[:, :r])
    top = torch.linalg.svd(w0 + delta, full_matrices=False)[0][:, :INTRUDER_TOP]
    best = (u0.T @ top).abs().max(dim=0).values
    return {"base_angle": angle, "intruder_dimensions": int((best < INTRUDER_THRESHOLD).sum())}


__all__ = ["INTRUDER_THRESHOLD", "INTRUDER_TOP", "alignment", "largest_principal_angle"]
