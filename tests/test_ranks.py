"""Rank allocation: energy, fixed, budget (checked by brute force) and the shaping options."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_audit.errors import OptionError
from lowrank_audit.ranks import LayerSpectrum, RankPolicy, allocate


def layer(name: str, values, rows: int | None = None, cols: int | None = None) -> LayerSpectrum:
    s = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    side = len(s)
    return LayerSpectrum(name, rows or side, cols or side, s, float(np.sum(s**2)))


def test_energy_rank_per_layer_and_monotone_in_target():
    layers = [layer("a", [4, 2, 1, 1]), layer("b", [1, 1, 1, 1])]
    got = [[a.rank for a in allocate(layers, RankPolicy.create(energy=e))] for e in (0.5, 0.8, 0.95, 1.0)]
    assert got == [[1, 2], [2, 4], [3, 4], [4, 4]]
    kept = allocate(layers, RankPolicy.create(energy=0.8))[0]
    assert kept.energy_kept == pytest.approx(20 / 22) and kept.params == 2 * 8


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=12), e1=st.floats(0.01, 1), e2=st.floats(0.01, 1))
def test_rank_is_monotone_in_the_energy_target(values, e1, e2):
    (low, high) = sorted((e1, e2))
    layers = [layer("w", values)]
    ranks = [allocate(layers, RankPolicy.create(energy=e))[0].rank for e in (low, high)]
    assert ranks[0] <= ranks[1]


def test_fixed_rank_min_max_and_round_to():
    layers = [layer("small", [3, 2, 1]), layer("big", np.arange(20, 0, -1))]
    assert [a.rank for a in allocate(layers, RankPolicy.create(rank=8))] == [3, 8]  # capped at min(m, n)
    assert [a.rank for a in allocate(layers, RankPolicy.create(rank=5, round_to=4))] == [3, 8]
    assert [a.rank for a in allocate(layers, RankPolicy.create(energy=0.01, min_rank=2))] == [2, 2]
    assert [a.rank for a in allocate(layers, RankPolicy.create(energy=1.0, max_rank=6))] == [3, 6]


def _energy(layers, ranks) -> float:
    return sum(float(np.sum(lay.singular_values[:k] ** 2)) for lay, k in zip(layers, ranks, strict=True))


def _cost(layers, ranks) -> int:
    return sum(k * (lay.rows + lay.cols) for lay, k in zip(layers, ranks, strict=True))


@settings(max_examples=80, deadline=None)
@given(
    spectra=st.lists(st.lists(st.floats(0.01, 10), min_size=2, max_size=4), min_size=2, max_size=3),
    sizes=st.lists(st.integers(4, 9), min_size=3, max_size=3),
    budget=st.integers(8, 120),
    round_to=st.sampled_from([1, 2]),
)
def test_budget_never_exceeded_and_optimal_for_what_it_spends(spectra, sizes, budget, round_to):
    layers = [layer(f"l{i}", s, rows=sizes[i], cols=len(s)) for i, s in enumerate(spectra)]
    policy = RankPolicy.create(budget_params=budget, round_to=round_to)
    minimum = sum(min(round_to, lay.side) * (lay.rows + lay.cols) for lay in layers)  # --min-rank 1, rounded
    if minimum > budget:
        with pytest.raises(OptionError, match="is below the"):
            allocate(layers, policy)
        return
    ranks = [a.rank for a in allocate(layers, policy)]
    spent = _cost(layers, ranks)
    assert spent <= budget
    # Brute force over every allocation the shaping options allow: none that costs no more
    # keeps more energy.
    choices = [[k for k in range(1, lay.side + 1) if k % round_to == 0 or k == lay.side] for lay in layers]
    best = max(_energy(layers, r) for r in itertools.product(*choices) if _cost(layers, r) <= spent)
    assert _energy(layers, ranks) >= best * (1 - 1e-12)


def test_budget_favours_steep_spectra_and_avg_rank_is_a_budget():
    steep = layer("steep", [10, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    flat = layer("flat", [3, 3, 3, 3, 3, 3, 3, 3])
    by_budget = [a.rank for a in allocate([steep, flat], RankPolicy.create(budget_params=8 * 16))]
    by_avg = [a.rank for a in allocate([steep, flat], RankPolicy.create(avg_rank=4))]
    assert by_budget == by_avg == [1, 7]
    # Negative control: a fixed rank spends the same parameters evenly and keeps less.
    even = [a.rank for a in allocate([steep, flat], RankPolicy.create(rank=4))]
    assert _energy([steep, flat], even) < _energy([steep, flat], by_budget)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"energy": 0.9, "rank": 4}, "--energy and --rank conflict"),
        ({"budget_params": 10, "avg_rank": 2}, "--budget-params and --avg-rank conflict"),
        ({"energy": 0.0}, r"energy must be in \(0, 1\]"),
        ({"energy": 1.5}, r"energy must be in \(0, 1\]"),
        ({"rank": 0}, "--rank must be a positive integer"),
        ({"min_rank": 4, "max_rank": 2}, "--max-rank 2 is below --min-rank 4"),
        ({"round_to": 0}, "--round-to must be a positive integer"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(OptionError, match=message):
        RankPolicy.create(**options)


def test_budget_below_min_rank_and_truncated_spectra_are_errors():
    layers = [layer("a", [3, 2, 1]), layer("b", [3, 2, 1])]
    with pytest.raises(OptionError, match="below the 12 that --min-rank 1 costs"):
        allocate(layers, RankPolicy.create(budget_params=11))
    top_only = LayerSpectrum("t", 100, 100, np.array([5.0, 4.0]), 100.0)  # 41 % of the energy known
    with pytest.raises(OptionError, match="t: the 2 singular values known hold less than 0.9"):
        allocate([top_only], RankPolicy.create(energy=0.9))
    with pytest.raises(OptionError, match="t: rank 8 needs 8 singular values"):
        allocate([top_only], RankPolicy.create(rank=8))


def _spec(name: str, rows: int, cols: int):
    from lowrank_audit.io.selection import MatrixSpec

    return MatrixSpec(name, name, "proj", None, "delta", (rows, cols), "float32", rows, cols, 1)


def test_rank_for_answers_once_the_known_values_settle_the_rank():
    s = 0.9 ** np.arange(100.0)
    energy = float(np.sum(s**2))
    spec = _spec("w", 100, 120)
    full = allocate([LayerSpectrum("w", 100, 120, s, energy)], RankPolicy.create(energy=0.95))[0].rank  # 15
    policy = RankPolicy.create(energy=0.95)
    assert policy.rank_for(spec, s[:10], energy) is None  # 10 values hold less than 95 %
    assert policy.rank_for(spec, s[:40], energy) == policy.rank_for(spec, s, energy) == full == 15
    # Shaping applies: rounded up, and a cap settles as soon as the values known reach it.
    assert RankPolicy.create(energy=0.95, round_to=8).rank_for(spec, s[:40], energy) == 16
    assert RankPolicy.create(energy=0.95, max_rank=6).rank_for(spec, s[:6], energy) == 6
    assert RankPolicy.create(energy=0.95, max_rank=6).rank_for(spec, s[:5], energy) is None
    # A fixed rank is known before any value; a zero matrix takes min_rank.
    assert RankPolicy.create(rank=150).rank_for(spec, s[:0], energy) == 100
    assert RankPolicy.create(energy=0.95, min_rank=2).rank_for(spec, s[:0], 0.0) == 2
    with pytest.raises(ValueError, match="allocates across matrices"):
        RankPolicy.create(avg_rank=4).rank_for(spec, s, energy)


def test_budget_never_stops_silently_at_the_end_of_a_truncated_spectrum():
    flat = np.ones(50)
    whole = LayerSpectrum("flat", 50, 50, flat, 50.0)
    top = LayerSpectrum("flat", 50, 50, flat[:10], 50.0)  # a randomized audit kept 10 of 50 values
    steep = LayerSpectrum("steep", 50, 50, np.r_[5.0, np.full(49, 0.01)], 25.0 + 49e-4)
    policy = RankPolicy.create(budget_params=30 * 100)  # 30 components of 50 x 50 in all
    assert [a.rank for a in allocate([whole, steep], policy)] == [29, 1]
    with pytest.raises(OptionError, match="flat: the budget reaches past the 10 singular values known"):
        allocate([top, steep], policy)
    # Negative control: a budget the known values cover allocates as with the whole spectrum.
    small = RankPolicy.create(budget_params=8 * 100)
    assert [a.rank for a in allocate([top, steep], small)] == [a.rank for a in allocate([whole, steep], small)]
