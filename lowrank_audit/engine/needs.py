"""What the engine must find for each matrix: how many top singular triplets it needs.

A :class:`Need` is asked about one matrix with the top of its spectrum known so far and
answers with a rank, or None while those values do not settle it. The engine asks it
before decomposing (with no values: a fixed rank answers at once, and one pass of the
right width follows) and after each block the randomized sketch grows, and stops as soon
as the answer is covered. So a fixed rank costs one sketch of that width, an energy target
grows the sketch until the top values hold it, and the caller's own rule (a rank policy's
rounding and caps, :meth:`lowrank_audit.ranks.RankPolicy.rank_for`) is one more need, never
a second pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lowrank_audit.io.selection import MatrixSpec
from lowrank_audit.metrics import energy_rank


class Need(Protocol):
    """How many top singular triplets one matrix needs."""

    def __call__(self, spec: MatrixSpec, s: np.ndarray, energy: float, floor: float = 0.0) -> int | None:
        """The rank needed, given ``s``: the top singular values known so far (float64,
        descending, possibly empty), ``energy`` = ||W||_F^2 and its precision ``floor``; None
        while ``s`` does not settle it. With the whole spectrum (``len(s) == min(rows,
        cols)``) it must answer."""


@dataclass(frozen=True)
class EnergyNeed:
    """The smallest k whose top values hold ``target`` of ||W||_F^2 (every value at 1.0)."""

    target: float

    def __call__(self, spec: MatrixSpec, s: np.ndarray, energy: float, floor: float = 0.0) -> int | None:
        side = min(spec.rows, spec.cols)
        if self.target >= 1 and energy > 0:
            return side
        k = energy_rank(s, energy, self.target)
        return side if k is None and len(s) >= side else k  # short of the target by rounding only


@dataclass(frozen=True)
class RankNeed:
    """A rank known before decomposing: the same for every matrix, or one per tensor name."""

    rank: int | Mapping[str, int]

    def __call__(self, spec: MatrixSpec, s: np.ndarray, energy: float, floor: float = 0.0) -> int:
        rank = self.rank if isinstance(self.rank, int) else self.rank[spec.name]
        return min(rank, spec.rows, spec.cols)


# What a spectrum report needs beyond its own test (lowrank_audit.bounds.settled, which the
# engine applies to every report): nothing.
REPORT_NEED = RankNeed(0)

__all__ = ["REPORT_NEED", "EnergyNeed", "Need", "RankNeed"]
