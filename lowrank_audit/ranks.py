"""Rank allocation: from spectra to one rank per matrix, shared by ``recommend`` and ``compress``.

Four ways to choose, exactly one per run:

- ``energy``: per matrix, the smallest k whose top-k singular values hold that share of
  ||W||_F^2 (the k of :func:`lowrank_audit.metrics.energy_rank`), less the matrix's
  precision floor unless ``above_floor`` is False: the energy that rounding to the stored
  dtype put into it is noise, and a target that reaches into it asks for noise;
- ``rank``: the same k everywhere, capped at min(m, n);
- ``budget_params``: a total number of adapter parameters, spent greedily on the rank-1
  components with the most energy per parameter (a component of an m x n matrix costs
  m + n), so matrices whose spectra are steep get less than flat ones;
- ``avg_rank``: the same budget written as an average rank, R * sum(m + n).

``min_rank``, ``max_rank`` and ``round_to`` then shape every rank: at least ``min_rank``,
rounded up to a multiple of ``round_to``, and never above ``max_rank`` or min(m, n)
(the caps win over rounding). Under a budget, ranks grow by ``round_to`` components at a
time, so rounding never breaks the budget.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lowrank_audit.errors import OptionError
from lowrank_audit.io.selection import MatrixSpec
from lowrank_audit.metrics import energy_rank

DEFAULT_ENERGY = 0.95


@dataclass(frozen=True)
class RankPolicy:
    """How ranks are chosen. Build with :meth:`create` to validate user input once."""

    energy: float | None = None
    rank: int | None = None
    budget_params: int | None = None
    avg_rank: float | None = None  # a budget of avg_rank * sum(m + n) over the matrices allocated
    min_rank: int = 1
    max_rank: int | None = None
    round_to: int = 1
    above_floor: bool = True  # energy targets apply to ||W||_F^2 less the precision floor

    @classmethod
    def create(
        cls,
        *,
        energy: float | None = None,
        rank: int | None = None,
        budget_params: int | None = None,
        avg_rank: float | None = None,
        min_rank: int = 1,
        max_rank: int | None = None,
        round_to: int = 1,
        above_floor: bool = True,
    ) -> RankPolicy:
        """Validate options as a user spells them; ``energy`` 0.95 when no way is given.

        Raises:
            OptionError: Two ways given at once, or a value out of its domain.
        """
        given = {"--energy": energy, "--rank": rank, "--budget-params": budget_params, "--avg-rank": avg_rank}
        chosen = [flag for flag, value in given.items() if value is not None]
        if len(chosen) > 1:
            raise OptionError(f"{' and '.join(chosen)} conflict: choose ranks one way")
        if energy is not None and not 0 < energy <= 1:
            raise OptionError(f"--energy must be in (0, 1] but got {energy}")
        for flag, value in (("--rank", rank), ("--budget-params", budget_params), ("--round-to", round_to)):
            if value is not None and value < 1:
                raise OptionError(f"{flag} must be a positive integer but got {value}")
        if avg_rank is not None and not avg_rank > 0:
            raise OptionError(f"--avg-rank must be positive but got {avg_rank}")
        if min_rank < 1:
            raise OptionError(f"--min-rank must be a positive integer but got {min_rank}")
        if max_rank is not None and max_rank < min_rank:
            raise OptionError(f"--max-rank {max_rank} is below --min-rank {min_rank}")
        if not chosen:
            energy = DEFAULT_ENERGY
        return cls(energy, rank, budget_params, avg_rank, min_rank, max_rank, round_to, above_floor)

    @property
    def per_matrix(self) -> bool:
        """Whether each matrix's rank depends on that matrix alone (energy or fixed rank), not on a budget."""
        return self.budget_params is None and self.avg_rank is None

    def rank_for(self, spec: MatrixSpec, s: np.ndarray, energy: float, floor: float = 0.0) -> int | None:
        """The rank :func:`allocate` gives one matrix, from the top of its spectrum known so far.

        A :class:`~lowrank_audit.engine.needs.Need`: the engine grows a randomized sketch
        until this answers, so a fixed rank (known before any value) costs one pass of
        that width and an energy target only as many values as it takes, with
        ``min_rank``, ``round_to`` and ``max_rank`` applied.

        Args:
            spec: The matrix (its name and shape).
            s: Its top singular values known so far, float64 descending, possibly empty.
            energy: Its ||W||_F^2.
            floor: Its precision floor (energy of storage rounding).

        Returns:
            The rank, or None while ``s`` does not settle it.
        """
        if not self.per_matrix:
            raise ValueError(f"a budget ({self.describe()}) allocates across matrices, not per matrix")
        return _rank_from_top(LayerSpectrum(spec.name, spec.rows, spec.cols, s, energy, floor), self)

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.budget_params is not None:
            return f"budget {self.budget_params:,} parameters"
        if self.avg_rank is not None:
            return f"average rank {self.avg_rank}"
        return f"energy {self.energy}" + ("" if self.above_floor else " (precision floor counted)")


@dataclass(frozen=True)
class LayerSpectrum:
    """What allocation needs of one matrix: its size, its (top) singular values, ||W||_F^2."""

    name: str
    rows: int
    cols: int
    singular_values: np.ndarray  # descending; may hold only the top of the spectrum
    energy: float
    floor: float = 0.0  # precision floor: energy of storage rounding (0 when unknown)

    @property
    def side(self) -> int:
        return min(self.rows, self.cols)


@dataclass(frozen=True)
class Allocation:
    """The rank chosen for one matrix, with the share of its energy kept and its cost."""

    name: str
    rank: int
    energy_kept: float  # sum of the top-rank s_i^2 over ||W||_F^2
    params: int  # rank * (rows + cols)


def _kept(layer: LayerSpectrum, rank: int) -> float:
    if rank >= layer.side or layer.energy == 0:
        return 1.0
    if rank > len(layer.singular_values):
        raise OptionError(
            f"{layer.name}: rank {rank} needs {rank} singular values but the spectrum holds "
            f"{len(layer.singular_values)}; audit it with --method exact"
        )
    return min(1.0, float(np.sum(layer.singular_values[:rank] ** 2)) / layer.energy)


def _shape(k: int, layer: LayerSpectrum, policy: RankPolicy) -> int:
    """Apply min_rank, round_to (up), then max_rank and min(m, n) (down)."""
    k = math.ceil(max(k, policy.min_rank) / policy.round_to) * policy.round_to
    return min(k, _cap(layer, policy))


def allocate(layers: Sequence[LayerSpectrum], policy: RankPolicy) -> list[Allocation]:
    """One rank per matrix under ``policy``, in the order of ``layers``.

    Raises:
        OptionError: A spectrum holds too few values for the rank asked (a truncated
            report row), or a budget smaller than ``min_rank`` everywhere costs.
    """
    if policy.budget_params is not None or policy.avg_rank is not None:
        ranks = _greedy(layers, policy)
    elif policy.rank is not None:
        ranks = [_shape(policy.rank, layer, policy) for layer in layers]
    else:
        ranks = [_per_matrix(layer, policy) for layer in layers]
    return [
        Allocation(layer.name, k, _kept(layer, k), k * (layer.rows + layer.cols))
        for layer, k in zip(layers, ranks, strict=True)
    ]


def _cap(layer: LayerSpectrum, policy: RankPolicy) -> int:
    return layer.side if policy.max_rank is None else min(layer.side, policy.max_rank)


def _rank_from_top(layer: LayerSpectrum, policy: RankPolicy) -> int | None:
    """A per-matrix policy's rank for ``layer``; None when its known values do not settle it."""
    if policy.rank is not None:
        return _shape(policy.rank, layer, policy)
    known = len(layer.singular_values)
    if layer.energy == 0:
        k: int | None = 0  # an unchanged matrix: min_rank decides
    elif policy.energy >= 1:
        k = layer.side  # every component, however small: energy 1.0 means full rank
    else:
        target = layer.energy - layer.floor if policy.above_floor and layer.floor < layer.energy else layer.energy
        k = energy_rank(layer.singular_values, target, policy.energy)
    if k is None and known >= layer.side:
        k = layer.side  # the whole spectrum, short of the target by rounding only
    if k is None and known >= _cap(layer, policy):
        return _cap(layer, policy)  # the energy rank lies beyond the known values, hence beyond the cap
    return None if k is None else _shape(k, layer, policy)


def _per_matrix(layer: LayerSpectrum, policy: RankPolicy) -> int:
    k = _rank_from_top(layer, policy)
    if k is None:
        raise OptionError(
            f"{layer.name}: the {len(layer.singular_values)} singular values known hold less than "
            f"{policy.energy} of its energy; audit it with --method exact"
        )
    return k


def _greedy(layers: Sequence[LayerSpectrum], policy: RankPolicy) -> list[int]:
    """Spend the budget on chunks of ``round_to`` components, best energy per parameter first.

    Within a matrix the chunks' energy per parameter never rises (singular values
    descend), so taking the best chunk each time fills every matrix from the top, and the
    result keeps the most energy of any allocation costing no more than it does. It stops
    at the first chunk that does not fit: skipping it for a cheaper one further down would
    lose that guarantee.

    A truncated spectrum (a randomized audit) says nothing of the components past its
    last value except that none holds more than that value. When such an unknown chunk
    would be the best next buy and fit the budget, the allocation cannot be certified and
    an error says so, rather than silently stopping short of that matrix's share.
    """
    budget = policy.budget_params
    if budget is None:
        budget = int(policy.avg_rank * sum(layer.rows + layer.cols for layer in layers))
    ranks = [_shape(0, layer, policy) for layer in layers]
    spent = sum(k * (layer.rows + layer.cols) for k, layer in zip(ranks, layers, strict=True))
    if spent > budget:
        raise OptionError(
            f"budget of {budget:,} parameters is below the {spent:,} that --min-rank "
            f"{policy.min_rank} costs on {len(layers)} matrices"
        )
    cap = [_cap(layer, policy) for layer in layers]
    heap: list[tuple[float, int, int, bool]] = []

    def push(i: int) -> None:
        layer, start = layers[i], ranks[i]
        s = layer.singular_values
        stop = min(start + policy.round_to, cap[i])
        if stop <= start:
            return
        gain = float(np.sum(s[start:stop] ** 2))
        unknown = stop > len(s)
        if unknown:  # past the known values: at most the last known each, and what the known leave
            rest = max(layer.energy - float(np.sum(s**2)), 0.0)
            gain += min((stop - max(start, len(s))) * float(s[-1] ** 2) if len(s) else rest, rest)
            unknown = gain > 0  # nothing left to find is known to be nothing
        heapq.heappush(heap, (-gain / ((stop - start) * (layer.rows + layer.cols)), i, stop, unknown))

    for i in range(len(layers)):
        push(i)
    while heap:
        _, i, stop, unknown = heapq.heappop(heap)
        cost = (stop - ranks[i]) * (layers[i].rows + layers[i].cols)
        if spent + cost > budget:
            break
        if unknown:
            raise OptionError(
                f"{layers[i].name}: the budget reaches past the {len(layers[i].singular_values)} singular values "
                f"known of this matrix (a truncated spectrum); audit it with --method exact"
            )
        spent += cost
        ranks[i] = stop
        push(i)
    return ranks


__all__ = ["DEFAULT_ENERGY", "Allocation", "LayerSpectrum", "RankPolicy", "allocate"]
