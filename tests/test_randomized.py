"""The randomized sketch (fixed rank and adaptive energy ranks) against exact float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lowrank_audit
from lowrank_audit.engine.config import EngineConfig
from lowrank_audit.engine.exact import Triplets
from lowrank_audit.engine.randomized import BLOCK, adaptive_svd
from lowrank_audit.errors import OptionError
from lowrank_audit.metrics import energy_rank
from tests.conftest import RANDOMIZED_ATOL, reference_singular_values, with_spectrum

SHAPES = [(400, 300), (300, 400), (350, 350), (600, 120)]


def power_law(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    side = min(rows, cols)
    return with_spectrum(rows, cols, 1 / torch.arange(1, side + 1, dtype=torch.float64), seed)


def top_k(w: torch.Tensor, k: int, *, seed: int = 0, **kwargs) -> Triplets:
    """The randomized top-k triplets of one float64 matrix, computed in float32; never the
    exact fallback (``exact_fraction=1``) unless the caller says otherwise."""
    kwargs = {"exact_fraction": 1.0} | kwargs
    (t,) = adaptive_svd(w.float()[None], [lambda s: k], seeds=[seed], vectors=True, **kwargs)
    return t


def _top_error(w: torch.Tensor, k: int, **kwargs) -> float:
    t = top_k(w, k, **kwargs)
    ref = reference_singular_values(w)
    return float(np.max(np.abs(t.s[:k].double().numpy() - ref[:k]))) / ref[0]


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_top_k_values_within_tolerance_and_negative_control(rows, cols):
    w = power_law(rows, cols, seed=rows)
    assert _top_error(w, 64) <= RANDOMIZED_ATOL
    # Without power iterations the same sketch misses the tolerance on this slow decay.
    assert _top_error(w, 64, power_iterations=0) > RANDOMIZED_ATOL


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_factors_are_near_optimal_rank_k_approximations(rows, cols):
    """Eckart-Young: ||W - U S Vh||_F^2 is close to the best possible, sum(s[k:]**2)."""
    w = power_law(rows, cols, seed=cols)
    t = top_k(w, 32, seed=1)
    u, s, vh = t.u.double(), t.s[: t.rank].double(), t.vh.double()
    assert u.shape == (rows, 32) and vh.shape == (32, cols)
    ref = reference_singular_values(w)
    best = float(np.sum(ref[32:] ** 2))
    got = float(torch.linalg.matrix_norm(w - (u * s) @ vh) ** 2)
    assert best <= got <= best * 1.02
    np.testing.assert_allclose((u.T @ u).numpy(), np.eye(32), atol=1e-5)  # orthonormal columns


def _ranks(s: np.ndarray, energy: float) -> tuple[int | None, ...]:
    return tuple(energy_rank(s, energy, t) for t in (0.90, 0.95, 0.99))


def _energy_values(w: torch.Tensor, target: float, seed: int, **kwargs) -> tuple[torch.Tensor, str]:
    """The values a spectrum report gets for ``target`` (at least BLOCK - OVERSAMPLE of them)."""
    energy = float(torch.linalg.matrix_norm(w) ** 2)
    need = [lambda s: energy_rank(s, energy, target)]
    (t,) = adaptive_svd(w.float()[None], need, seeds=[seed], vectors=False, min_width=BLOCK, **kwargs)
    return t.s, t.method


def geometric(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """s_i = 0.85**i: each step near a threshold moves the energy share by a clear margin."""
    side = min(rows, cols)
    return with_spectrum(rows, cols, 0.85 ** torch.arange(side, dtype=torch.float64), seed)


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_adaptive_energy_ranks_equal_exact_ones(rows, cols):
    w = geometric(rows, cols, seed=rows + cols)
    energy = float(torch.linalg.matrix_norm(w) ** 2)
    s, method = _energy_values(w, 0.99, seed=3)
    assert method == "randomized" and len(s) <= min(rows, cols) / 4
    ref = reference_singular_values(w)
    assert _ranks(s.double().numpy(), energy) == _ranks(ref, energy) == (8, 10, 15)


@pytest.mark.parametrize(("rows", "cols"), SHAPES[:3])
def test_adaptive_rank_off_by_at_most_one_when_flat_at_the_threshold(rows, cols):
    # On s_i = 1/i the 99 % threshold falls near k = 57, where one more value adds only
    # 2e-4 of the energy: an underestimate within tolerance may cost one more.
    w = power_law(rows, cols, seed=rows + cols)
    energy = float(torch.linalg.matrix_norm(w) ** 2)
    s, method = _energy_values(w, 0.99, seed=3)
    assert method == "randomized"
    got, want = _ranks(s.double().numpy(), energy), _ranks(reference_singular_values(w), energy)
    assert got[:2] == want[:2]  # k90 and k95 lie where the curve is still steep
    assert want[2] <= got[2] <= want[2] + 1  # randomized values err low, so never below


def test_flat_spectrum_falls_back_to_exact():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))  # k99 near 190
    s, method = _energy_values(w.double(), 0.99, seed=0)
    assert method == "exact" and len(s) == 200


def test_rank_cap_stops_growth():
    s, method = _energy_values(power_law(300, 200), 0.99, seed=0, rank_cap=20)
    assert method == "randomized" and len(s) == 20


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """Matrices above the auto threshold (smaller side > 1024) stay exact in CI otherwise."""
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    tensors = {f"layers.{i}.proj.weight": geometric(1100, 1040, seed=i).float() for i in range(2)}
    save_file(tensors, path)
    return path, tensors


def test_auto_uses_randomized_on_large_matrices_and_leaves_whole_spectrum_figures_empty(big_checkpoint):
    path, tensors = big_checkpoint
    frame = lowrank_audit.spectrum(path, device="cpu", method="auto")
    assert (frame["method"] == "randomized").all() and (frame["k"] < 1040 / 4).all()
    for column in ("nuclear_norm", "effective_rank", "numerical_rank", "signal_rank", "condition_number"):
        assert frame[column].isna().all(), column
    for row in frame.to_dict("records"):
        ref = reference_singular_values(tensors[row["name"]])
        energy = float(np.sum(ref**2))
        assert (row["k90"], row["k95"], row["k99"]) == _ranks(ref, energy)
        assert row["frobenius_norm"] == pytest.approx(energy**0.5, rel=1e-6)
        assert row["stable_rank"] == pytest.approx(energy / ref[0] ** 2, rel=1e-5)
        assert (row["k90"], row["k95"], row["k99"]) == (8, 10, 15)


def test_same_seed_same_values_and_batching_does_not_matter(big_checkpoint):
    path, _ = big_checkpoint
    runs = [
        lowrank_audit.spectrum(path, device="cpu", method="randomized", seed=7, max_batch_mb=mb) for mb in (1, 1, 64)
    ]
    values = [r["singular_values"].map(list).tolist() for r in runs]
    assert values[0] == values[1]  # same seed: identical
    np.testing.assert_allclose(np.array(values[0]), np.array(values[2]), rtol=1e-5)  # one batch or two
    other = lowrank_audit.spectrum(path, device="cpu", method="randomized", seed=8)
    assert other["singular_values"].map(list).tolist() != values[0]  # the seed is used
    assert other["k95"].tolist() == runs[0]["k95"].tolist()


def test_method_options_are_validated():
    with pytest.raises(OptionError, match="method must be one of auto, exact, randomized"):
        EngineConfig.create(method="lanczos")
    with pytest.raises(OptionError, match="rank-cap limits the randomized method"):
        EngineConfig.create(method="exact", rank_cap=8)
    with pytest.raises(OptionError, match="positive integer"):
        EngineConfig.create(rank_cap=0)
