"""`compress ADAPTER`: a LoRA adapter resized in its own format, checked with PEFT itself and
against the exact truncations of each module's update (float64 SVD of the dense product)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowrank_audit.analyses import resize as resize_module
from lowrank_audit.cli import app
from lowrank_audit.errors import VerificationError
from lowrank_audit.io.adapters import open_adapter
from lowrank_audit.ranks import RankPolicy

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
LORA = SAMPLES / "lora"
runner = CliRunner()
TRUNCATION_RTOL = 1e-2  # the 1 %; float32 factors reproduce it to about 1e-6


def _updates(path) -> dict[str, torch.Tensor]:
    """Each module's update as the adapter applies it, dense in float64 (the reference)."""
    with open_adapter(path) as adapter:
        return {name: adapter.delta(name) for name in adapter.modules}


def _truncation(dense: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _compress(*args: str):
    result = runner.invoke(app, ["compress", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("adapter", ["rank4in16", "gd"])
def test_rank_4_adapter_loads_in_peft_and_holds_the_exact_truncations(tmp_path, adapter):
    out = tmp_path / "r4"
    _compress(LORA / adapter, "--rank", "4", "--out", out)
    config = json.loads((out / "adapter_config.json").read_text())
    base = transformers.AutoModelForCausalLM.from_pretrained(SAMPLES / "base-sharded").eval()
    model = peft.PeftModel.from_pretrained(base, out)
    original = _updates(LORA / adapter)
    layers = dict(model.base_model.model.named_modules())
    assert set(config["rank_pattern"].values()) == {4} and len(config["rank_pattern"]) == len(original)
    for name, dense in original.items():
        layer = layers[name]
        assert layer.r["default"] == 4, name  # rank_pattern reached PEFT for every module
        got = layer.get_delta_weight("default").double()
        assert _relative(got, _truncation(dense, 4)) <= TRUNCATION_RTOL, name
    report = __import__("pandas").read_parquet(out / "compress-report.parquet")
    assert (report["rank"] == 4).all() and (report["treatment"] == "resized").all()
    if adapter == "rank4in16":  # the update had rank 4: nothing lost
        assert report["relative_error"].max() < 1e-5 and report["energy_kept"].min() > 1 - 1e-9


def test_energy_ranks_equal_the_exact_energy_ranks(tmp_path):
    out = tmp_path / "e95"
    _compress(LORA / "gd", "--energy", "0.95", "--out", out)
    report = __import__("pandas").read_parquet(out / "compress-report.parquet").set_index("name")
    for name, dense in _updates(LORA / "gd").items():
        s = np.linalg.svd(dense.numpy(), compute_uv=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        assert report.loc[name, "rank"] == int(np.argmax(share >= 0.95)) + 1, name
        kept = share[report.loc[name, "rank"] - 1]
        assert report.loc[name, "energy_kept"] == pytest.approx(kept, rel=1e-9)
        assert report.loc[name, "relative_error"] == pytest.approx(np.sqrt(1 - kept), rel=1e-4, abs=1e-6)  # fp32


def test_kohya_resize_keeps_its_format_and_conv_kernels(tmp_path):
    out = tmp_path / "k"
    _compress(LORA / "kohya.safetensors", "--rank", "2", "--out", out)
    written = load_file(out / "kohya.safetensors")
    assert written["lora_conv_test.lora_down.weight"].shape == (2, 8, 3, 3)
    assert written["lora_conv_test.lora_up.weight"].shape == (16, 2, 1, 1)
    assert float(written["lora_conv_test.alpha"]) == 2.0
    again = _updates(out / "kohya.safetensors")
    for name, dense in _updates(LORA / "kohya.safetensors").items():
        assert _relative(again[name], _truncation(dense, 2)) <= 1e-5, name


def test_excluded_modules_keep_their_factors_and_scale(tmp_path):
    out = tmp_path / "x"
    _compress(LORA / "gd", "--rank", "2", "--exclude", "*q_proj", "--out", out)
    before, after = _updates(LORA / "gd"), _updates(out)
    for name in before:
        if name.endswith("q_proj"):
            assert _relative(after[name], before[name]) < 1e-7, name
        else:
            assert _relative(after[name], _truncation(before[name], 2)) < 1e-5, name


def test_a_written_module_that_drifts_is_refused_and_nothing_written(tmp_path, monkeypatch):
    """Negative control of the verification: factors perturbed after the truncation."""
    shaped = resize_module._shaped

    def perturbed(m, adapter, b, a):
        b, a = shaped(m, adapter, b, a)
        return b * 1.01, a

    monkeypatch.setattr(resize_module, "_shaped", perturbed)
    with pytest.raises(VerificationError, match=r"reproduces its rank-4 truncation only to 1\.0e-02"):
        resize_module.resize(LORA / "gd", tmp_path / "bad", RankPolicy.create(rank=4))
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_options_are_refused_with_an_adapter(tmp_path):
    result = runner.invoke(app, ["compress", str(LORA / "gd"), "--base", str(SAMPLES / "base.safetensors"),
                                 "--rank", "2", "--out", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and "is a LoRA adapter, resized as it is: --base apply to checkpoints" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_rank_above_a_module_s_own_keeps_it_whole(tmp_path):
    """--rank 12 on an r = 8 adapter: no module gets more values than it has (kohya keeps the
    smaller rank too); the written updates are the originals."""
    out = tmp_path / "r12"
    _compress(LORA / "gd", "--rank", "12", "--out", out)
    report = __import__("pandas").read_parquet(out / "compress-report.parquet")
    assert (report["rank"] == 8).all() and report["relative_error"].max() < 1e-6


def test_options_that_would_be_ignored_are_refused(tmp_path):
    """Engine options do not apply to a resize (exact float64 SVDs of r x r cores); a report
    takes neither --revision nor --alignment."""
    result = runner.invoke(app, ["compress", str(LORA / "gd"), "--method", "exact", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--method apply to checkpoints" in result.stderr
    report = tmp_path / "r.parquet"
    assert runner.invoke(app, ["spectrum", str(LORA / "gd"), "--out", str(report), "-q"]).exit_code == 0
    revision = runner.invoke(app, ["recommend", str(report), "--revision", "v1"])
    assert revision.exit_code == 2 and "--revision applies to a checkpoint" in revision.stderr
    alignment = runner.invoke(app, ["check", str(report), "--alignment"])
    assert alignment.exit_code == 2 and "--alignment applies only when SOURCE is a checkpoint" in alignment.stderr
