"""``spectrum()`` end to end on the sample checkpoints, against float64 references."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowrank_audit
from lowrank_audit import metrics
from lowrank_audit.errors import UnpairedTensorsWarning
from lowrank_audit.formats.report import write_report
from lowrank_audit.io.checkpoint import open_checkpoint
from lowrank_audit.io.provenance import checkpoint_inputs, hashing_inputs
from tests.conftest import assert_singular_values_close, reference_energy_rank, reference_singular_values

TARGETS = {"k90": 0.90, "k95": 0.95, "k99": 0.99}


@pytest.fixture(scope="module")
def delta_report(samples):
    return lowrank_audit.spectrum(samples / "finetuned.safetensors", base=samples / "base.safetensors", device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delta_spectra_match_float64_reference(samples, dtype):
    frame = lowrank_audit.spectrum(samples / "finetuned.safetensors", base=samples / "base.safetensors",
                                   device="cpu", dtype=str(dtype).removeprefix("torch."))  # fmt: skip
    ft, base = load_file(samples / "finetuned.safetensors"), load_file(samples / "base.safetensors")
    assert sorted(frame["name"]) == sorted(n for n, t in ft.items() if t.ndim == 2)  # one row per matrix
    for row in frame.to_dict("records"):
        ref = reference_singular_values(ft[row["name"]].double() - base[row["name"]].double())
        assert_singular_values_close(np.array(row["singular_values"]), ref, dtype)
        for column, target in TARGETS.items():
            k, margin, wobble = reference_energy_rank(ref, target, dtype)
            assert margin > wobble, "reference too close to the threshold for an exact comparison"
            assert row[column] == k, (row["name"], column)
        assert row["stable_rank"] == pytest.approx(np.sum(ref**2) / ref[0] ** 2, rel=1e-4)
        assert row["effective_rank"] == pytest.approx(metrics.effective_rank(ref), rel=1e-4)
        assert row["frobenius_norm"] == pytest.approx(float(np.linalg.norm(ref)), rel=1e-5)


def test_negative_control_weights_are_not_deltas(samples, delta_report):
    """The reference comparison above can fail: the weights' spectra are far from the deltas'."""
    weights = lowrank_audit.spectrum(samples / "finetuned.safetensors", device="cpu")
    row = weights[weights["name"] == "lm_head.weight"].iloc[0]
    ft, base = load_file(samples / "finetuned.safetensors"), load_file(samples / "base.safetensors")
    ref = reference_singular_values(ft["lm_head.weight"].double() - base["lm_head.weight"].double())
    with pytest.raises(AssertionError, match="s_1"):
        assert_singular_values_close(np.array(row["singular_values"]), ref, torch.float32)


def _numbers(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["singular_values"]).reset_index(drop=True)


@pytest.mark.parametrize(("ft", "base"), [("finetuned-sharded", "base-sharded"), ("finetuned.bin", "base.bin")])
def test_every_format_gives_the_same_report(samples, delta_report, ft, base):
    other = lowrank_audit.spectrum(samples / ft, base=samples / base, device="cpu")
    pd.testing.assert_frame_equal(_numbers(other), _numbers(delta_report))
    assert other["singular_values"].map(list).tolist() == delta_report["singular_values"].map(list).tolist()


def test_sample_facts_in_readme_hold(samples, delta_report):
    """sample_checkpoints/README.md: the fine-tuning update is low-rank-dominated, the weights are not."""
    weights = lowrank_audit.spectrum(samples / "finetuned.safetensors", device="cpu").set_index("name")
    delta = delta_report.set_index("name")
    mlp_and_vocab = [
        n for n in delta.index if any(r in n for r in ("_proj", "embed", "lm_head")) and "self_attn" not in n
    ]
    assert len(mlp_and_vocab) == 8
    for name in mlp_and_vocab:
        assert delta.at[name, "k95"] <= 16 and weights.at[name, "k95"] >= 39, name
    assert (delta["k95"] < weights["k95"]).all()
    assert (delta["k95"].max(), weights["k95"].min()) == (23, 31)


def test_synthetic_known_answers(samples):
    frame = lowrank_audit.spectrum(samples / "synthetic.safetensors", device="cpu").set_index(
        ["name", "expert"], drop=False
    )
    for name in ("exact_rank4.weight", "noisy_rank4.weight"):
        row = frame[frame["name"] == name].iloc[0]
        assert (row["k90"], row["k95"], row["k99"], row["signal_rank"]) == (2, 3, 4, 4), name
        assert row["spectral_norm"] == pytest.approx(8.0, rel=1e-5)
        assert row["frobenius_norm"] == pytest.approx(85**0.5, rel=1e-5)
    assert frame[frame["name"] == "exact_rank4.weight"]["numerical_rank"].item() == 4
    experts = frame[frame["name"] == "experts.weight"]
    assert experts["expert"].tolist() == [0, 1, 2, 3] and (experts["rows"] == 32).all()
    conv = frame[frame["name"] == "conv.weight"].iloc[0]
    assert (conv["rows"], conv["cols"], conv["shape"].tolist()) == (16, 72, [16, 8, 3, 3])
    assert set(frame.attrs["lowrank_audit"]["skipped"]) == {"norm.weight", "token_ids"}
    # A 1 x n matrix has one singular value, its norm.
    row = frame[frame["name"] == "row.weight"].iloc[0]
    with safe_open(str(samples / "synthetic.safetensors"), "pt") as f:
        norm = float(f.get_tensor("row.weight").double().norm())
    assert len(row["singular_values"]) == 1 and row["singular_values"][0] == pytest.approx(norm, rel=1e-6)
    assert (row["k90"], row["k95"], row["k99"], row["stable_rank"]) == (1, 1, 1, pytest.approx(1.0))


def test_bf16_checkpoint_is_upcast_exactly(samples):
    frame = lowrank_audit.spectrum(samples / "finetuned-bf16.safetensors", device="cpu")
    stored = load_file(samples / "finetuned-bf16.safetensors")
    assert (frame["dtype"] == "bfloat16").all()
    for row in frame.to_dict("records"):
        ref = reference_singular_values(stored[row["name"]].double())
        assert_singular_values_close(np.array(row["singular_values"]), ref, torch.float32)


def test_nonfinite_matrix_does_not_stop_the_run(samples, tmp_path):
    tensors = load_file(samples / "base.safetensors")
    tensors["lm_head.weight"][3, 5] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    frame = lowrank_audit.spectrum(tmp_path / "nan.safetensors", device="cpu").set_index("name")
    assert frame.at["lm_head.weight", "nonfinite"] == 1 and frame.at["lm_head.weight", "method"] == "skipped"
    assert pd.isna(frame.at["lm_head.weight", "k95"]) and frame["k95"].notna().sum() == 15


def test_unpaired_names_warn(samples, tmp_path):
    tensors = load_file(samples / "base.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "base-minus-head.safetensors")
    with pytest.warns(
        UnpairedTensorsWarning, match=r"1 tensors not paired with base, skipped: lm_head.weight \(only in fine-tune\)"
    ):
        frame = lowrank_audit.spectrum(
            samples / "finetuned.safetensors", base=tmp_path / "base-minus-head.safetensors", device="cpu"
        )
    assert len(frame) == 15 and frame.attrs["lowrank_audit"]["unpaired"] == {"lm_head.weight": "only in fine-tune"}


def test_same_input_same_report_bytes(samples, tmp_path):
    paths = []
    for i in range(2):
        frame = lowrank_audit.spectrum(
            samples / "finetuned.safetensors", base=samples / "base.safetensors", device="cpu"
        )
        frame.attrs["lowrank_audit"]["created"] = "fixed"  # the only field allowed to differ
        paths.append(write_report(frame, tmp_path / f"r{i}.parquet"))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_provenance(samples, delta_report):
    meta = delta_report.attrs["lowrank_audit"]
    assert meta["tool_version"] == lowrank_audit.__version__ and meta["torch_version"] == torch.__version__
    assert meta["device"] == "cpu"
    files = meta["inputs"]["checkpoint"]["files"]
    assert files[0]["size"] == (samples / "finetuned.safetensors").stat().st_size and len(files[0]["sha256"]) == 64
    assert meta["inputs"]["base"]["path"].endswith("base.safetensors")


def test_inputs_hashed_in_the_background_are_the_inputs_hashed_in_turn(samples):
    with open_checkpoint(samples / "finetuned-sharded") as ckpt, open_checkpoint(samples / "base.safetensors") as base:
        with hashing_inputs(ckpt, base) as digests:
            background = digests()
        assert background == checkpoint_inputs(ckpt, base)
    digest = background["base"]["files"][0]
    assert digest["sha256"] == hashlib.sha256((samples / "base.safetensors").read_bytes()).hexdigest()


def test_background_hashing_stops_when_the_audit_fails(samples):
    ckpt = open_checkpoint(samples / "finetuned.safetensors")
    with ckpt, pytest.raises(ZeroDivisionError), hashing_inputs(ckpt):
        1 / 0  # noqa: B018 - an error in the engine, before the digests are asked for
    assert not [t for t in threading.enumerate() if t.name.startswith("lowrank-audit-hash")]


def test_inputs_are_hashed_only_when_asked(samples):
    with open_checkpoint(samples / "finetuned.safetensors") as ckpt:
        with hashing_inputs(ckpt, hashed=False) as digests:
            plain = digests()
        assert plain["checkpoint"]["files"][0]["sha256"] is None
        assert plain["checkpoint"]["files"][0]["size"] == (samples / "finetuned.safetensors").stat().st_size
        assert checkpoint_inputs(ckpt)["checkpoint"]["files"][0]["sha256"] is not None  # negative control
