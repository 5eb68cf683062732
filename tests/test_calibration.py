"""Activation-aware compression (compress --calibration): lower held-out output error than
plain truncation at the same rank, on each layer and on the whole sample model."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lowrank_audit.analyses.calibration import DAMPING_START, whitening
from lowrank_audit.analyses.compress import compress
from lowrank_audit.cli import app
from lowrank_audit.errors import CheckpointError, OptionError
from lowrank_audit.formats.lowrank import expand
from lowrank_audit.io.activations import Moments
from lowrank_audit.ranks import RankPolicy
from tests.conftest import SAMPLES

FT = SAMPLES / "finetuned.safetensors"
CAL = SAMPLES / "calibration"
DUMPS = sorted(CAL.glob("dump-*.safetensors"))
MOMENTS = sorted(CAL.glob("moments-*.safetensors"))
HELDOUT = sorted(CAL.glob("heldout-*.safetensors"))
RANK = 8


def _heldout_rows() -> dict[str, torch.Tensor]:
    rows = {}
    for shard in HELDOUT:
        rows |= {m: t.reshape(-1, t.shape[-1]).double() for m, t in load_file(shard).items()}
    return rows


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """W' of every matrix at rank 8: plain truncation, and calibrated on the dumps."""
    out = {}
    for label, calibration in (("plain", ()), ("calibrated", DUMPS)):
        folder = tmp_path_factory.mktemp(label)
        report = compress(FT, folder / "c", policy=RankPolicy.create(rank=RANK), calibration=calibration,
                          method="exact")  # fmt: skip
        expand(folder / "c", folder / "dense.safetensors")
        out[label] = load_file(folder / "dense.safetensors")
        out[label + "-report"] = report
    return out


def _output_error(w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm((w.double() - approx.double()) @ x.T))


def test_each_layer_keeps_its_held_out_outputs_better(dense):
    original, heldout = load_file(FT), _heldout_rows()
    plain = {m: _output_error(original[f"{m}.weight"], dense["plain"][f"{m}.weight"], x) for m, x in heldout.items()}
    cal = {m: _output_error(original[f"{m}.weight"], dense["calibrated"][f"{m}.weight"], x) for m, x in heldout.items()}
    assert len(heldout) == 15
    # Measured: lower on 13 of the 15 layers (lm_head and one other slightly higher: 256
    # calibration rows for 64 to 128 features fit a little noise), and lower in total.
    better = [m for m in heldout if cal[m] < plain[m]]
    assert len(better) >= 12, {m: (cal[m], plain[m]) for m in heldout}
    assert sum(cal.values()) < sum(plain.values())
    # Negative control: on isotropic rows, which the calibration did not see, plain
    # truncation (optimal for ||W - W'||_F) wins in total.
    gen = torch.Generator().manual_seed(0)
    noise = {m: torch.randn(512, x.shape[1], generator=gen, dtype=torch.float64) for m, x in heldout.items()}
    plain_noise = sum(
        _output_error(original[f"{m}.weight"], dense["plain"][f"{m}.weight"], x) for m, x in noise.items()
    )
    cal_noise = sum(_output_error(original[f"{m}.weight"], dense["calibrated"][f"{m}.weight"], x)
                    for m, x in noise.items())  # fmt: skip
    assert cal_noise > plain_noise


def _model(weights: dict[str, torch.Tensor]):
    spec = importlib.util.spec_from_file_location("sample_tiny_llama", SAMPLES / "tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    model = module.TinyLlamaForCausalLM(module.TinyLlamaConfig())
    model.load_state_dict(weights)
    return model.eval()


def test_the_whole_model_keeps_its_held_out_logits_better(dense):
    ids = load_file(CAL / "tokens.safetensors")["heldout"]
    with torch.no_grad():
        want = _model(load_file(FT))(ids)
        errors = {
            label: float(torch.linalg.vector_norm(_model(dense[label])(ids) - want))
            for label in ("plain", "calibrated")
        }
    assert errors["calibrated"] < errors["plain"], errors


def test_report_marks_calibrated_matrices_and_their_damping(dense):
    report = dense["calibrated-report"].set_index("name")
    calibrated = report[report["calibrated"]]
    assert len(calibrated) == 15 and not report.loc["model.embed_tokens.weight", "calibrated"]
    assert (calibrated["damping"] == DAMPING_START).all() and calibrated["output_error"].notna().all()
    assert report.loc["model.embed_tokens.weight", "output_error"] is pd_na()
    plain = dense["plain-report"]
    assert not plain["calibrated"].any() and plain["damping"].isna().all()


def pd_na():
    import pandas as pd

    return pd.NA


def test_moments_and_dumps_calibrate_alike(tmp_path):
    a = compress(FT, tmp_path / "a", policy=RankPolicy.create(rank=RANK), calibration=DUMPS, method="exact")
    b = compress(FT, tmp_path / "b", policy=RankPolicy.create(rank=RANK), calibration=MOMENTS, method="exact")
    assert (a["output_error"].fillna(-1) - b["output_error"].fillna(-1)).abs().max() < 1e-6


def test_energy_targets_apply_to_the_outputs(tmp_path):
    report = compress(FT, tmp_path / "e", policy=RankPolicy.create(energy=0.9), calibration=DUMPS, method="exact")
    calibrated = report[report["calibrated"].fillna(False).astype(bool)]
    assert (calibrated["energy_kept"] >= 0.9).all()
    # Negative control: the same ranks do not hold 0.9 of the weights' own energy everywhere,
    # so the target was applied to the whitened spectrum, not to W's.
    weights = load_file(FT)
    plain_share = [
        float(np.sum(s[:rank] ** 2) / np.sum(s**2))
        for name, rank in zip(calibrated["name"], calibrated["rank"], strict=True)
        for s in [np.linalg.svd(weights[name].double().numpy(), compute_uv=False)]
    ]
    assert min(plain_share) < 0.9


def test_damping_grows_until_the_factorization_exists():
    # A moments file may hold a Gram that is not positive semidefinite (rounding, or edits):
    # eigenvalues 1, 1, 1, -0.5 need λ·mean(diag) = λ·0.625 > 0.5, so λ grows from 1e-6 to 1.
    gram = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5], dtype=torch.float64))
    w = whitening(Moments("m", gram, torch.zeros(4, dtype=torch.float64), 10), "acts.safetensors")
    assert DAMPING_START < w.damping == 1.0
    assert torch.allclose(w.factor @ w.factor.T, gram + w.damping * gram.diagonal().mean() * torch.eye(4))
    # A well-conditioned Gram keeps the starting damping (negative control of the growth).
    m = Moments.empty("m", 8)
    m.add(torch.randn(50, 8, dtype=torch.float64))
    assert whitening(m, "acts.safetensors").damping == DAMPING_START
    # Past DAMPING_MAX it is an error, never a silent fallback.
    worse = torch.diag(torch.tensor([1.0, 1.0, 1.0, -2.0], dtype=torch.float64))
    with pytest.raises(CheckpointError, match="not positive definite even with damping 1"):
        whitening(Moments("m", worse, torch.zeros(4, dtype=torch.float64), 10), "acts.safetensors")


def test_bad_calibration_is_one_line_exit_2(tmp_path):
    save_file({"model.layers.0.mlp.down_proj": torch.randn(10, 64)}, tmp_path / "wide.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"wide\.safetensors: module 'model\.layers\.0\.mlp\.down_proj' has activations of width 64",
    ):
        compress(FT, tmp_path / "o", calibration=[tmp_path / "wide.safetensors"])
    save_file({"other.module": torch.randn(10, 64)}, tmp_path / "none.safetensors")
    with pytest.raises(OptionError, match="no module in common"):
        compress(FT, tmp_path / "o", calibration=[tmp_path / "none.safetensors"])
    bad = torch.randn(10, 64)
    bad[2, 3] = float("nan")
    save_file({"model.layers.0.self_attn.q_proj": bad}, tmp_path / "nan.safetensors")
    result = CliRunner().invoke(app, ["compress", str(FT), "-o", str(tmp_path / "o"), "--calibration",
                                      str(tmp_path / "nan.safetensors")])  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and "nan.safetensors: module 'model.layers.0.self_attn.q_proj' has 1 activation rows" in lines[0]
    )
    assert not (tmp_path / "o").exists()


def test_a_calibration_file_inside_the_output_is_an_input_never_replaced(tmp_path):
    out = tmp_path / "compressed"
    out.mkdir()
    acts = out / "acts.safetensors"
    acts.write_bytes(MOMENTS[0].read_bytes())
    result = CliRunner().invoke(app, ["compress", str(FT), "--rank", "4", "--calibration", str(acts), "--out", str(out),
                                      "--force"])  # fmt: skip
    assert result.exit_code == 2 and "would overwrite input" in result.stderr
    assert acts.read_bytes() == MOMENTS[0].read_bytes()


def test_calibration_files_are_in_the_provenance_with_their_hash(dense):
    inputs = dense["calibrated-report"].attrs["lowrank_audit"]["inputs"]
    assert [d["path"] for d in inputs["calibration"]] == [str(p) for p in DUMPS]
    assert all(len(d["sha256"]) == 64 and d["size"] > 0 for d in inputs["calibration"])
