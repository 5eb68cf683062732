"""The precision floor: the energy storage rounding puts into a matrix, and ranks above it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lowrank_audit
from lowrank_audit.analyses.recommend import recommend
from lowrank_audit.io.selection import FLOOR_SAMPLE, rounding_energy
from lowrank_audit.metrics import energy_rank
from lowrank_audit.ranks import RankPolicy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 1024), (1024, 1100)])  # read whole, and sampled (> FLOOR_SAMPLE values)
def test_floor_matches_the_rounding_it_models(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = 0.02 * torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    x[:, :, :8] *= 10  # outlier columns, as in LLM weights
    x[:, 3:6, :] *= 3  # and a few outlier rows
    stored = x.to(dtype)
    floors = rounding_energy(stored)
    actual = (stored.double() - x).square().sum((1, 2))
    # An expectation against one draw: the 8 outlier columns hold half the energy, a few
    # thousand values whose squared rounding errors sum to within a few % of their mean; a
    # sampled estimate (the larger shape) reads a third of the rows, perhaps no outlier row.
    sampled = shape[0] * shape[1] > FLOOR_SAMPLE
    for floor, real in zip(floors, actual.tolist(), strict=True):
        assert floor == pytest.approx(real, rel=0.1 if sampled else 0.05)
    # Negative control: another format's spacing is off by orders of magnitude.
    other = rounding_energy(x.float().to(torch.bfloat16 if dtype == torch.float16 else torch.float16))
    assert other[0] != pytest.approx(floors[0], rel=0.5)


def test_floor_counts_nothing_for_nan_and_inf_and_float64():
    t = torch.tensor([[[1.0, float("nan"), float("inf"), 0.0]]], dtype=torch.float16)
    (floor,) = rounding_energy(t)
    assert floor == pytest.approx(2.0 ** (-10 * 2) / 12 + 2.0 ** (-24 * 2) / 12)  # 1.0, and 0 as a subnormal
    assert rounding_energy(torch.ones(1, 2, 2, dtype=torch.float64)) == [0.0]


def _pair(tmp_path, floor_share: float):
    """A rank-8 update on a random float32 base, both stored in fp16, scaled so that rounding
    holds about ``floor_share`` of the delta's energy."""
    gen = torch.Generator().manual_seed(1)
    base = 0.02 * torch.randn(256, 192, generator=gen)
    u, v = torch.linalg.qr(torch.randn(256, 8, generator=gen)).Q, torch.linalg.qr(torch.randn(192, 8, generator=gen)).Q
    update = (u * torch.arange(8, 0, -1.0)) @ v.T
    floor = rounding_energy(base.half()[None])[0] * 2
    update *= ((1 - floor_share) / floor_share * floor / float(update.square().sum())) ** 0.5
    save_file({"w.weight": base.half()}, tmp_path / "base.safetensors")
    save_file({"w.weight": (base + update).half()}, tmp_path / "ft.safetensors")
    delta = (base + update).half().double() - base.half().double()
    return tmp_path / "ft.safetensors", tmp_path / "base.safetensors", delta


def test_report_floor_is_the_rounding_share_of_the_update(tmp_path):
    ft, base, delta = _pair(tmp_path, 0.05)
    row = lowrank_audit.spectrum(ft, base=base).iloc[0]
    assert row["precision_floor"] == pytest.approx(0.05, rel=0.05)
    # The signal is 8 components; past them is the rounding noise the floor measures, less the
    # share of it the 8 signal directions hold, 8 (m + n) / (m n) = 7 %.
    s = torch.linalg.svdvals(delta).numpy()
    tail = float(np.sum(s[8:] ** 2) / np.sum(s**2))
    assert tail == pytest.approx(row["precision_floor"] * (1 - 8 * (256 + 192) / (256 * 192)), rel=0.03)


def test_recommend_ignores_energy_below_the_floor(tmp_path):
    ft, base, delta = _pair(tmp_path, 0.05)
    s = torch.linalg.svdvals(delta).numpy()
    energy = float(np.sum(s**2))
    above = recommend(ft, RankPolicy.create(energy=0.99), base=base)["rank"].iloc[0]
    counted = recommend(ft, RankPolicy.create(energy=0.99, above_floor=False), base=base)["rank"].iloc[0]
    floor = lowrank_audit.spectrum(ft, base=base)["precision_floor"].iloc[0] * energy
    assert above == energy_rank(s, energy - floor, 0.99) <= 8  # the signal only
    assert counted == energy_rank(s, energy, 0.99) > 50  # 99 % of everything reaches deep into the noise


def test_floor_of_a_matrix_larger_than_any_stride_table():
    """An embedding of 20000 x 14000 (280 M values; a LLaMA-3 vocabulary is larger) samples
    every p-th row with p odd, whatever its size. An expanded view: no memory is allocated."""
    big = torch.full((1, 1), 0.02, dtype=torch.float16).expand(1, 20000, 14000)
    (floor,) = rounding_energy(big)
    spacing = 2.0 ** (-6 - 10)  # 0.02 lies in [2^-6, 2^-5): fp16 spacing 2^-16
    assert floor == pytest.approx(20000 * 14000 * spacing**2 / 12, rel=1e-6)
