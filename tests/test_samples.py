"""The committed sample checkpoints are exactly what make_samples.py produces."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

FILES = [
    "base.safetensors", "finetuned.safetensors", "finetuned-bf16.safetensors", "synthetic.safetensors",
    "synthetic.npz", "truncated.safetensors",
    *(f"{m}-sharded/{f}" for m in ("base", "finetuned") for f in (
        "config.json", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")),
]  # fmt: skip


@pytest.fixture(scope="module")
def regenerated(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    subprocess.run(
        [sys.executable, str(samples / "make_samples.py"), "--out", str(out)], check=True, capture_output=True
    )
    return out


@pytest.mark.parametrize("name", FILES)
def test_regeneration_is_byte_identical(samples, regenerated, name):
    assert (regenerated / name).read_bytes() == (samples / name).read_bytes()


@pytest.mark.parametrize("name", ["base.bin", "finetuned.bin"])
def test_regenerated_bin_has_identical_tensors(samples, regenerated, name):
    # torch.save stamps every file with a random serialization id, so compare contents.
    new = torch.load(regenerated / name, weights_only=True)
    old = torch.load(samples / name, weights_only=True)
    assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in old)


def test_sample_files_stay_small(samples):
    for path in samples.rglob("*"):
        if path.is_file():
            assert path.stat().st_size < 400_000, path
