"""The engine against float64 NumPy references, batching, devices, non-finite input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lowrank_audit.engine.batches import plan_batches, squared_norms
from lowrank_audit.engine.config import EngineConfig, resolve_device
from lowrank_audit.engine.decompose import spectra
from lowrank_audit.engine.exact import singular_values
from lowrank_audit.engine.sources import CheckpointSource
from lowrank_audit.errors import OptionError
from lowrank_audit.io.checkpoint import open_checkpoint
from lowrank_audit.io.selection import select_matrices
from lowrank_audit.metrics import ENERGY_TARGETS, energy_rank
from tests.conftest import (
    assert_singular_values_close,
    low_rank_plus_noise,
    reference_energy_rank,
    reference_singular_values,
)

SHAPES = [(1, 40), (40, 1), (2, 2), (37, 5), (5, 37), (64, 64), (200, 30), (30, 200), (128, 96)]


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_singular_values_match_float64_reference(rows, cols, dtype):
    batch = torch.stack([_random((rows, cols), seed) for seed in range(3)])  # (3, rows, cols)
    got = singular_values(batch.to(dtype)).double().numpy()
    for i in range(3):
        ref = reference_singular_values(batch[i])
        assert_singular_values_close(got[i], ref, dtype)
        for target in ENERGY_TARGETS:
            k, margin, wobble = reference_energy_rank(ref, target, dtype)
            assert margin > wobble or min(rows, cols) == 1  # 1xN: a single value, always rank 1
            assert energy_rank(got[i], float(np.sum(got[i] ** 2)), target) == k


def test_bfloat16_inputs_are_upcast_before_the_decomposition():
    w = low_rank_plus_noise(96, 64, 6, 0.01, seed=7).bfloat16()
    got = singular_values(w.float()[None])[0].double().numpy()
    # The reference is the bf16 matrix itself, exactly representable in float64.
    assert_singular_values_close(got, reference_singular_values(w.double()), torch.float32)


def test_negative_controls_show_the_tolerances_have_teeth():
    w = _random((128, 96), seed=11)
    ref = reference_singular_values(w)
    # Decomposing in bfloat16 precision (rounding the input) must fail the float32 tolerance...
    with pytest.raises(AssertionError, match="s_1"):
        assert_singular_values_close(
            singular_values(w.bfloat16().float()[None])[0].double().numpy(), ref, torch.float32
        )
    # ... and a float32 decomposition must fail the float64 tolerance.
    with pytest.raises(AssertionError, match="s_1"):
        assert_singular_values_close(singular_values(w.float()[None])[0].double().numpy(), ref, torch.float64)


def test_plan_batches_respects_budget_and_groups_shapes(samples):
    with open_checkpoint(samples / "finetuned.safetensors") as ckpt:
        specs = select_matrices(ckpt).specs
    budget = 64 * 128 * 4 * 3  # room for three 64x128 float32 matrices
    plan = plan_batches(specs, itemsize=4, max_batch_bytes=budget)
    assert sorted(s.name for b in plan for s in b) == sorted(s.name for s in specs)
    for batch in plan:
        assert len({(s.rows, s.cols) for s in batch}) == 1
        assert sum(s.numel * 4 for s in batch) <= budget
    # A spec larger than the budget forms a batch of its own instead of being dropped.
    tiny = plan_batches(specs, itemsize=4, max_batch_bytes=1)
    assert [len(b) for b in tiny] == [1] * len(specs)


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path)
    return path


def test_results_do_not_depend_on_batch_size(tmp_path):
    tensors = {f"layers.{i}.proj.weight": _random((48, 32), i).float() for i in range(6)}
    path = _write(tmp_path / "m.safetensors", tensors)
    outs = []
    for budget_mb in (1e-3, 1.0):
        with open_checkpoint(path) as ckpt:
            sel = select_matrices(ckpt)
            cfg = EngineConfig.create(device="cpu", max_batch_mb=budget_mb)
            outs.append({r.spec.name: r.singular_values for r in spectra(CheckpointSource(ckpt, sel.specs), cfg)})
    for name, w in tensors.items():
        # Batching only stacks; each matrix is decomposed by the same kernel, bit for bit.
        assert np.array_equal(outs[0][name], outs[1][name]), name
        assert_singular_values_close(outs[0][name], reference_singular_values(w), torch.float32)


def test_nonfinite_matrices_are_counted_not_decomposed(tmp_path):
    bad = _random((4, 8, 6), 1).float()
    bad[2, 0, 0] = float("nan")
    bad[2, 1, 1] = float("inf")
    path = _write(tmp_path / "moe.safetensors", {"experts.weight": bad})
    progress = []
    with open_checkpoint(path) as ckpt:
        sel = select_matrices(ckpt)
        results = list(
            spectra(CheckpointSource(ckpt, sel.specs), EngineConfig.create(device="cpu"), progress=progress.append)
        )
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.nonfinite for r in results] == [0, 0, 2, 0]
    assert results[2].singular_values is None
    for i in (0, 1, 3):
        assert_singular_values_close(results[i].singular_values, reference_singular_values(bad[i]), torch.float32)
    assert progress[-1].matrices_done == progress[-1].matrices_total == 4
    assert progress[-1].bytes_done == progress[-1].bytes_total == bad.numel() * 4


def test_squared_norms_match_float64_and_survive_float32_overflow():
    stack = _random((3, 300, 700), 2).float()
    stack[1] *= 1e18  # row norms near 2.6e19 * sqrt(700): their squares overflow float32
    stack[2, 5, 5] = float("nan")
    energies, counts = squared_norms(stack)
    want = [float(np.sum(m.double().numpy() ** 2)) for m in stack[:2]]
    np.testing.assert_allclose(energies[:2], want, rtol=1e-7)
    assert np.isnan(energies[2]) and counts == [0, 0, 1]
    # Negative control: summing the squares in float32 overflows on the scaled matrix.
    assert not np.isfinite(float(stack[1].square().sum()))


def test_device_and_option_validation():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(OptionError, match="auto, cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(OptionError, match="float32, float64"):
        EngineConfig.create(dtype="float16")
    with pytest.raises(OptionError, match="positive"):
        EngineConfig.create(max_batch_mb=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_request_without_cuda_is_a_clear_error():
    with pytest.raises(OptionError, match="not available"):
        resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(dtype):
    batch = torch.stack([_random((256, 128), seed) for seed in range(4)])
    got = singular_values(batch.to(dtype).cuda()).cpu().double().numpy()
    for i in range(4):
        assert_singular_values_close(got[i], reference_singular_values(batch[i]), dtype)


@pytest.mark.parametrize("overlap", [False, True])
def test_batches_in_flight_stay_within_the_budget(tmp_path, monkeypatch, overlap):
    """CPU: one batch at a time, the whole budget. CUDA: two in flight, half each."""
    import lowrank_audit.engine.batches as batches

    tensors = {f"layers.{i}.proj.weight": _random((64, 64), i).float() for i in range(12)}
    path = _write(tmp_path / "m.safetensors", tensors)
    budget_mb = 64 * 64 * 4 * 4 / 2**20  # four matrices' worth
    sizes, threads, loaded_batches, alive = [], set(), [], []
    original = batches.load

    def spy(batch_specs, *args):
        import threading

        threads.add(threading.current_thread().name)
        # Batches whose buffer is still held, counting the one about to be read.
        alive.append(1 + sum(b.stack is not None for b in loaded_batches))
        loaded = original(batch_specs, *args)
        sizes.append(loaded.stack.numel() * loaded.stack.element_size())
        loaded_batches.append(loaded)
        return loaded

    monkeypatch.setattr(batches, "load", spy)
    config = EngineConfig.create(device="cpu", max_batch_mb=budget_mb)
    if overlap:  # the CUDA policy, exercised on the CPU
        monkeypatch.setattr(batches, "overlaps", lambda cfg: True)
    with open_checkpoint(path) as ckpt:
        results = list(spectra(CheckpointSource(ckpt, select_matrices(ckpt).specs), config))
    assert len(results) == 12 and all(r.singular_values is not None for r in results)
    in_flight = 2 if overlap else 1
    assert max(sizes) * in_flight <= budget_mb * 2**20 and len(sizes) == 3 * in_flight
    assert max(alive) == in_flight
    assert all(name.startswith("lowrank-audit-read") for name in threads) == overlap


def test_read_errors_on_the_prefetch_thread_reach_the_caller(tmp_path, monkeypatch):
    from lowrank_audit.errors import CheckpointError
    from lowrank_audit.io.checkpoint import Checkpoint

    path = _write(tmp_path / "m.safetensors", {f"l.{i}.weight": _random((8, 8), i).float() for i in range(4)})

    def broken(self, name):
        raise CheckpointError(f"{path}: cannot read tensor {name!r}: disk gone")

    with open_checkpoint(path) as ckpt:
        specs = select_matrices(ckpt).specs
        monkeypatch.setattr(Checkpoint, "__getitem__", broken)
        with pytest.raises(CheckpointError, match="cannot read tensor 'l.0.weight': disk gone"):
            list(spectra(CheckpointSource(ckpt, specs), EngineConfig.create(device="cpu")))
