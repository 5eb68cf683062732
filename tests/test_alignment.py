"""Alignment of an update with its base: principal angles and intruder dimensions, against
float64 NumPy/SciPy references, on an update inside the base's top subspace and on a random one."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import lowrank_audit
from lowrank_audit.analyses.alignment import INTRUDER_THRESHOLD, INTRUDER_TOP
from lowrank_audit.cli import app
from tests.conftest import with_spectrum

runner = CliRunner()


def _pair(tmp_path, kind: str):
    """A base W0 (48 x 40, values 10, 9.5, ... ) and a fine-tune W0 + ΔW: ΔW inside W0's top-3
    singular directions ("inside"), or a random rank-4 update of 3x W0's norm ("random")."""
    gen = torch.Generator().manual_seed(7)
    w0 = with_spectrum(48, 40, torch.linspace(10, 0.5, 40, dtype=torch.float64), seed=3)
    u0, _, v0h = torch.linalg.svd(w0, full_matrices=False)
    if kind == "inside":
        delta = (u0[:, :3] * torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)) @ v0h[:3]
    else:
        delta = torch.randn(48, 4, generator=gen, dtype=torch.float64) @ torch.randn(
            4, 40, generator=gen, dtype=torch.float64
        )
        delta *= 3 * torch.linalg.matrix_norm(w0, 2) / torch.linalg.matrix_norm(delta, 2)
    save_file({"layer.weight": w0.float()}, tmp_path / "base.safetensors")
    save_file({"layer.weight": (w0 + delta).float()}, tmp_path / f"{kind}.safetensors")
    # the reference works on what was stored: float32 values, exactly upcast
    w0 = w0.float().double()
    return w0, (w0 + delta).float().double() - w0


def _reference(w0: torch.Tensor, delta: torch.Tensor, r: int) -> tuple[float, int]:
    u0 = np.linalg.svd(w0.numpy(), full_matrices=False)[0]
    ud = np.linalg.svd(delta.numpy(), full_matrices=False)[0]
    angle = float(np.degrees(scipy.linalg.subspace_angles(ud[:, :r], u0[:, :r]).max()))
    top = np.linalg.svd((w0 + delta).numpy(), full_matrices=False)[0][:, :INTRUDER_TOP]
    intruders = int((np.abs(u0.T @ top).max(axis=0) < INTRUDER_THRESHOLD).sum())
    return angle, intruders


@pytest.mark.parametrize("kind", ["inside", "random"])
def test_alignment_equals_the_reference(tmp_path, kind):
    w0, delta = _pair(tmp_path, kind)
    frame = lowrank_audit.spectrum(tmp_path / f"{kind}.safetensors", tmp_path / "base.safetensors", device="cpu",
                                   dtype="float64", alignment=True)  # fmt: skip
    row = frame.iloc[0]
    angle, intruders = _reference(w0, delta, int(row["k95"]))
    # float32 storage leaves 1e-7 noise beside the update; its subspace moves by noise / gap (~1e-6 rad)
    assert row["base_angle"] == pytest.approx(angle, abs=1e-3)
    assert row["intruder_dimensions"] == intruders
    if kind == "inside":  # the update acts in the base's own top directions: no intruders
        assert row["base_angle"] < 1e-3 and intruders == 0
    else:  # a large random update brings its own directions to the top
        assert row["base_angle"] > 60 and intruders >= 3


def test_without_alignment_the_columns_are_null_and_a_base_is_needed(tmp_path):
    _pair(tmp_path, "random")
    plain = lowrank_audit.spectrum(tmp_path / "random.safetensors", tmp_path / "base.safetensors", device="cpu")
    assert plain["base_angle"].isna().all() and plain["intruder_dimensions"].isna().all()
    result = runner.invoke(app, ["spectrum", str(tmp_path / "random.safetensors"), "--alignment"])
    assert result.exit_code == 2 and "needs --base BASE" in result.stderr


def test_check_bounds_intruder_dimensions(tmp_path):
    _pair(tmp_path, "inside")
    _pair(tmp_path, "random")
    (tmp_path / "policy.toml").write_text('[[rule]]\ncolumn = "intruder_dimensions"\nmax = 0\n')
    verdicts = {}
    for kind in ("inside", "random"):
        result = runner.invoke(app, ["check", str(tmp_path / f"{kind}.safetensors"), "--base",
                                     str(tmp_path / "base.safetensors"), "--alignment", "--policy",
                                     str(tmp_path / "policy.toml")])  # fmt: skip
        verdicts[kind] = result.exit_code
    assert verdicts == {"inside": 0, "random": 1}


def test_an_adapter_with_its_base_gets_alignment(tmp_path):
    """A kohya update in the base's top directions has no intruders; the adapter's module maps to
    its base weight by name."""
    w0 = with_spectrum(32, 24, torch.linspace(5, 0.2, 24, dtype=torch.float64), seed=5)
    u0, s0, v0h = torch.linalg.svd(w0, full_matrices=False)
    save_file({"model.layers.0.q_proj.weight": w0.float().contiguous()}, tmp_path / "base.safetensors")
    up, down = (u0[:, :2] * 0.3).float().contiguous(), v0h[:2].float().contiguous()
    save_file({"lora_model_layers_0_q_proj.lora_up.weight": up, "lora_model_layers_0_q_proj.lora_down.weight": down},
              tmp_path / "lora.safetensors")  # fmt: skip
    frame = lowrank_audit.spectrum(tmp_path / "lora.safetensors", tmp_path / "base.safetensors", device="cpu")
    row = frame.iloc[0]
    assert row["kind"] == "adapter" and row["intruder_dimensions"] == 0 and row["base_angle"] < 0.01
