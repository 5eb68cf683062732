"""recommend, compress and expand from the command line: output, files, and refusals (exit 2)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lowrank_audit.analyses.recommend import RANKS_SCHEMA
from lowrank_audit.cli import app
from lowrank_audit.formats.report import read_report
from tests.conftest import SAMPLES

BASE, FT = str(SAMPLES / "base.safetensors"), str(SAMPLES / "finetuned.safetensors")
runner = CliRunner()


def test_recommend_writes_ranks_and_a_peft_config(tmp_path):
    files = ["--out", str(tmp_path / "r.parquet"), "--peft-config", str(tmp_path / "cfg.json")]
    result = runner.invoke(app, ["recommend", FT, "--base", BASE, "--energy", "0.9", "--round-to", "4", *files])
    assert result.exit_code == 0, result.output
    assert "16 layers" in result.output
    ranks = read_report(tmp_path / "r.parquet", schema=RANKS_SCHEMA)
    assert (ranks["rank"] % 4 == 0).all() and (ranks["energy_kept"] >= 0.9).all()
    config = json.loads((tmp_path / "cfg.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ranks["module"])
    assert config["rank_pattern"][r"model\.layers\.1\.mlp\.down_proj"] == int(
        ranks.loc[ranks["module"] == "model.layers.1.mlp.down_proj", "rank"].iloc[0]
    )
    assert config["alpha_pattern"] == config["rank_pattern"]


def test_recommend_from_a_report_equals_recommend_from_the_checkpoint(tmp_path):
    report = tmp_path / "s.parquet"
    assert runner.invoke(app, ["spectrum", FT, "--base", BASE, "-o", str(report), "-q"]).exit_code == 0
    outs = []
    for source in ([str(report)], [FT, "--base", BASE]):
        out = tmp_path / f"r{len(outs)}.parquet"
        assert runner.invoke(app, ["recommend", *source, "--avg-rank", "4", "-o", str(out)]).exit_code == 0
        outs.append(read_report(out, schema=RANKS_SCHEMA)[["name", "rank"]])
    assert outs[0].equals(outs[1])


def test_compress_prints_totals_and_expand_round_trips(tmp_path):
    result = runner.invoke(app, ["compress", FT, "--base", BASE, "--energy", "0.9", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output and "verified and written" in result.output
    assert (tmp_path / "a" / "compress-report.parquet").exists()
    assert runner.invoke(app, ["compress", FT, "--energy", "0.5", "--out", str(tmp_path / "lr")]).exit_code == 0
    result = runner.invoke(app, ["expand", str(tmp_path / "lr"), "--out", str(tmp_path / "dense.safetensors")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--energy", "0.9", "--rank", "8"], "--energy and --rank conflict"),
        (["--energy", "1.5"], r"energy must be in \(0, 1\]"),
        (["--energy", "0"], r"energy must be in \(0, 1\]"),
        (["--budget-params", "10", "--avg-rank", "2"], "conflict"),
    ],
)
def test_compress_refuses_bad_rank_options_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", FT, "--base", BASE, *args, "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("Error:") and len(result.output.strip().splitlines()) <= 2
    assert __import__("re").search(message, result.output)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_compress_refuses_existing_output_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["compress", FT, "--base", BASE, "--out", str(out)])
    assert result.exit_code == 2 and "exists; use --force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert runner.invoke(app, ["compress", FT, "--base", BASE, "--out", str(out), "--force"]).exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_compress_refuses_a_base_missing_a_module_and_an_output_over_an_input(tmp_path):
    from safetensors.torch import load_file, save_file

    partial = load_file(BASE)
    del partial["model.layers.1.mlp.up_proj.weight"]
    save_file(partial, tmp_path / "partial.safetensors")
    result = runner.invoke(app, ["compress", FT, "--base", str(tmp_path / "partial.safetensors"),
                                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and "base has no tensor 'model.layers.1.mlp.up_proj.weight'" in result.output
    assert not (tmp_path / "o").exists()
    result = runner.invoke(app, ["compress", FT, "--base", BASE, "--out", str(SAMPLES)])
    assert result.exit_code == 2 and "would overwrite input" in result.output
    result = runner.invoke(app, ["expand", FT, "--out", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 2 and "not a lowrank-audit factorized checkpoint" in result.output
