"""The LoRA samples (sample_checkpoints/lora, made by make_lora_samples.py) as the tool reads them:
factor balance kept by plain gradient descent and lost by AdamW, a rank-4 update inside r = 16,
the same update in kohya layout, and `check` rules on adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import lowrank_audit
from lowrank_audit.cli import app

LORA = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "lora"
runner = CliRunner()


def rows(name: str) -> dict[str, dict]:
    frame = lowrank_audit.spectrum(LORA / name, device="cpu")
    return {r["name"]: r for r in frame.to_dict("records")}


def test_plain_gradient_descent_keeps_the_factors_balanced_and_adamw_does_not():
    """B^T B - A A^T is conserved by gradient flow: from a balanced start (imbalance 1e-8) plain
    SGD ends within 2e-3 in every module; AdamW with weight decay ends above 0.1 in some."""
    gd, adam = rows("gd"), rows("adam")
    training = json.loads((LORA / "gd" / "training.json").read_text())["modules"]
    assert set(gd) == set(training) == set(adam)
    for module, figures in training.items():
        # the report's figure is the training script's, computed independently from the same factors
        assert gd[module]["factor_imbalance"] == pytest.approx(figures["end"]["imbalance_rel"], rel=1e-3, abs=1e-8)
        assert gd[module]["factor_norm_ratio"] == pytest.approx(figures["end"]["norm_ratio_B_over_A"], rel=1e-4)
    assert max(r["factor_imbalance"] for r in gd.values()) < 2e-3
    assert max(r["factor_imbalance"] for r in adam.values()) > 0.1  # the negative control
    unbalanced = rows("unbalanced")
    assert min(r["factor_imbalance"] for r in unbalanced.values()) > 1e3
    assert all(r["factor_norm_ratio"] == pytest.approx(1e4, rel=1e-3) for r in unbalanced.values())


def test_a_rank_4_update_inside_r_16_reads_4():
    for name, row in rows("rank4in16").items():
        assert row["adapter_rank"] == 16 and row["numerical_rank"] == 4, name
        assert row["k99"] <= 4 and row["adapter_usage"] <= 0.25, name


def test_the_kohya_file_is_the_gd_adapter():
    gd, kohya = rows("gd"), rows("kohya.safetensors")
    for module, row in gd.items():
        other = kohya["lora_" + module.replace(".", "_")]
        assert (other["rows"], other["cols"], other["adapter_rank"]) == (row["rows"], row["cols"], 8)
        np.testing.assert_allclose(
            other["singular_values"], row["singular_values"], rtol=0, atol=1e-6 * row["spectral_norm"]
        )
    conv = kohya["lora_conv_test"]
    assert (conv["rows"], conv["cols"], conv["numerical_rank"]) == (16, 72, 4)


def _check(tmp_path, source: str, policy: str):
    (tmp_path / "policy.toml").write_text(policy)
    return runner.invoke(app, ["check", str(LORA / source), "--policy", str(tmp_path / "policy.toml")])


def test_check_bounds_an_adapter_s_rank_and_its_waste(tmp_path):
    """The adapter-rank rule runs on an adapter without --base; a bound on adapter_usage says
    "no module wastes more than half its rank"."""
    holds = _check(tmp_path, "rank4in16", "[[adapter-rank]]\nrank = 4\n")
    assert holds.exit_code == 0, holds.output
    broken = _check(tmp_path, "rank4in16", "[[adapter-rank]]\nrank = 3\n")
    assert broken.exit_code == 1 and "4 singular values above 0.01·σ₁; the claim is 3" in broken.stdout
    wasteful = _check(tmp_path, "rank4in16", '[[rule]]\ncolumn = "adapter_usage"\nmin = 0.5\n')
    assert wasteful.exit_code == 1 and "14 findings" in wasteful.stdout + wasteful.stderr
    lenient = _check(tmp_path, "rank4in16", '[[rule]]\ncolumn = "adapter_usage"\nmin = 0.1\n')
    assert lenient.exit_code == 0, lenient.output


def test_recommend_on_an_adapter_gives_the_ranks_its_updates_need():
    result = runner.invoke(app, ["recommend", str(LORA / "rank4in16"), "--energy", "0.99", "--json"])
    assert result.exit_code == 0, result.output
    ranks = [r["rank"] for r in json.loads(result.stdout)["rows"]]
    assert len(ranks) == 14 and max(ranks) <= 4
