"""Resident memory is bounded by a batch, not by the checkpoint (Linux: /proc/self/status)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_audit.engine.config import EngineConfig
from lowrank_audit.engine.decompose import spectra
from lowrank_audit.engine.sources import CheckpointSource
from lowrank_audit.io.checkpoint import open_checkpoint
from lowrank_audit.io.selection import select_matrices

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssFile from /proc/self/status")
MIB = 2**20
TENSORS = 24  # 24 tensors of 2 MiB: a 48 MiB checkpoint


def rss_file() -> int:
    """File-backed resident memory of this process: pages of memory-mapped files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mem") / "ckpt.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({f"layers.{i:02d}.proj.weight": torch.randn(1024, 512, generator=gen) for i in range(TENSORS)}, path)
    return path


def test_mapped_pages_stay_bounded_by_the_batch(checkpoint):
    peaks = []
    with open_checkpoint(checkpoint) as ckpt:
        specs = select_matrices(ckpt).specs
        before = rss_file()
        config = EngineConfig.create(device="cpu", method="randomized", rank_cap=4, max_batch_mb=4)
        for _ in spectra(CheckpointSource(ckpt, specs), config, progress=lambda p: peaks.append(rss_file())):
            peaks.append(rss_file())
    growth = max(peaks) - before
    # Batches of 4 MiB (two tensors): allow a few batches of slack, far below 48 MiB.
    assert growth < 12 * MIB, f"file-backed RSS grew by {growth / MIB:.1f} MiB"


def test_negative_control_one_long_lived_map_grows_with_the_checkpoint(checkpoint):
    before = rss_file()
    with safe_open(str(checkpoint), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - a safe_open handle
            f.get_tensor(name).sum()  # touch the data: tensors may be views of the map
        growth = rss_file() - before
    assert growth > 40 * MIB, f"expected the whole 48 MiB file resident, saw {growth / MIB:.1f} MiB"
