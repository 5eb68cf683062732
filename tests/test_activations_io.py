"""Activation files: dumps streamed in bounded chunks and moments files give the same XᵀX."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lowrank_audit.io.activations as acts
from lowrank_audit.errors import CheckpointError
from lowrank_audit.io.activations import Moments, is_moments, read_activations, write_moments

# XᵀX summed chunk by chunk in float64 against one float64 product: rounding differs by a
# few ulps of the largest entry (measured below 1e-13 relative for these sizes).
GRAM_RTOL = 1e-12


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen)


def _reference(x: torch.Tensor) -> np.ndarray:
    x = x.reshape(-1, x.shape[-1]).double().numpy()
    return x.T @ x


def _close(got: torch.Tensor, want: np.ndarray) -> bool:
    return float(np.max(np.abs(got.numpy() - want))) <= GRAM_RTOL * float(np.max(np.abs(want)))


def test_dumps_in_shards_and_chunks_give_the_stacked_gram(tmp_path, monkeypatch):
    monkeypatch.setattr(acts, "CHUNK_BYTES", 8 * 16 * 7)  # 7 rows of width 16 per chunk
    a, b = _rows(50, 16, 0), _rows(3 * 5 * 16, 16, 1).reshape(3, 80, 16)
    save_file({"m.proj": a}, tmp_path / "s1.safetensors")
    save_file({"m.proj": b}, tmp_path / "s2.safetensors")
    got = read_activations([tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"])["m.proj"]
    stacked = torch.cat([a, b.reshape(-1, 16)])
    assert got.count == 290 and got.nonfinite == 0
    assert _close(got.xtx, _reference(stacked))
    assert torch.allclose(got.total, stacked.double().sum(0))
    # Negative control: one shard alone is not the stacked Gram.
    alone = read_activations([tmp_path / "s1.safetensors"])["m.proj"]
    assert not _close(alone.xtx, _reference(stacked))


def test_moments_round_trip_and_add_up_with_dumps(tmp_path):
    x, y = _rows(40, 8, 2), _rows(30, 8, 3)
    m = Moments.empty("layer", 8)
    m.add(x)
    write_moments([m], tmp_path / "m.safetensors")
    save_file({"layer": y}, tmp_path / "d.safetensors")
    assert is_moments(tmp_path / "m.safetensors") and not is_moments(tmp_path / "d.safetensors")
    both = read_activations([tmp_path / "m.safetensors", tmp_path / "d.safetensors"])["layer"]
    assert both.count == 70 and _close(both.xtx, _reference(torch.cat([x, y])))


def test_centered_gram_is_the_gram_of_centered_rows():
    x = _rows(60, 6, 4) + 3.0
    m = Moments.empty("l", 6)
    m.add(x)
    centered = x.double() - x.double().mean(0)
    assert _close(m.gram(center=True), _reference(centered))
    assert not _close(m.gram(), _reference(centered))  # negative control


def test_nonfinite_rows_are_counted_and_left_out():
    x = _rows(10, 4, 5)
    x[3, 1] = float("nan")
    m = Moments.empty("l", 4)
    m.add(x)
    assert m.nonfinite == 1 and m.count == 9
    assert _close(m.xtx, _reference(torch.cat([x[:3], x[4:]])))


def test_bad_activation_files_name_the_file_and_module(tmp_path):
    save_file({"m": torch.randn(4, 8)}, tmp_path / "a.safetensors")
    save_file({"m": torch.randn(4, 6)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"b\.safetensors: module 'm' has width 6 here but 8"):
        read_activations([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    save_file({"ids": torch.arange(8).reshape(2, 4)}, tmp_path / "ints.safetensors")
    with pytest.raises(CheckpointError, match=r"ints\.safetensors: tensor 'ids' is not activations"):
        read_activations([tmp_path / "ints.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: cannot read activations"):
        read_activations([tmp_path / "junk.safetensors"])
    with pytest.raises(CheckpointError, match="no such activation file"):
        read_activations([tmp_path / "absent.safetensors"])
