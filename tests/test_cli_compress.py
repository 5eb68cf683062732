"""recommend, compress and expand from the command line: output, files, and refusals (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lowrank_audit import spectrum
from lowrank_audit.analyses.compress import COMPRESS_SCHEMA
from lowrank_audit.analyses.recommend import RANKS_SCHEMA, peft_config, recommend
from lowrank_audit.cli import app
from lowrank_audit.errors import VerificationError
from lowrank_audit.formats.report import read_report
from lowrank_audit.ranks import RankPolicy
from tests.conftest import SAMPLES
from tests.pairs import energy_rank_of, write_pair

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
    assert config["rank_pattern"][r"^model\.layers\.1\.mlp\.down_proj"] == int(
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
        (["--energy", "1.5"], r"--energy must be in \(0, 1\] but got 1\.5"),
        (["--energy", "0"], r"--energy must be in \(0, 1\] but got 0"),
        (["--energy=-0.5"], r"--energy must be in \(0, 1\] but got -0\.5"),
        (["--energy", "nan"], r"--energy must be in \(0, 1\] but got nan"),
        (["--budget-params", "10", "--avg-rank", "2"], "conflict"),
    ],
)
def test_compress_refuses_bad_rank_options_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", FT, "--base", BASE, *args, "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("Error:") and len(result.output.strip().splitlines()) == 1
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


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    return write_pair(folder, unchanged=("model.layers.1.mlp.down_proj.weight",))


def test_compress_energy_0995_randomized_succeeds_in_one_pass(pair, tmp_path):
    base, ft, spectra = pair
    out = tmp_path / "a"
    args = ["compress", str(ft), "--base", str(base), "--energy", "0.995", "--method", "randomized", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = read_report(out / "compress-report.parquet", schema=COMPRESS_SCHEMA)
    lora = report[report["treatment"] == "lora"]
    assert set(lora["name"]) == {n for n, s in spectra.items() if s[0] > 0}  # the unchanged matrix is not there
    for row in lora.to_dict("records"):
        assert row["rank"] == energy_rank_of(spectra[row["name"]], 0.995)


def test_a_failed_verification_names_the_module_and_the_distance(tmp_path, monkeypatch):
    import lowrank_audit.analyses.compress as compress_module

    split = compress_module._split

    def corrupt(f, dtype):  # the factors written for one module are 5 % off
        a, b = split(f, dtype)
        return (a * 1.05, b) if f.spec.name == "model.layers.0.self_attn.q_proj.weight" else (a, b)

    monkeypatch.setattr(compress_module, "_split", corrupt)
    out = tmp_path / "adapter"
    with pytest.raises(VerificationError) as err:
        compress_module.compress(FT, out, base=BASE, policy=RankPolicy.create(rank=4))
    message = str(err.value)
    assert message.startswith(f"{out}: module 'model.layers.0.self_attn.q_proj' reproduces its rank-4 truncation")
    assert "only to 5.0e-02 relative (tolerance 1e-05); nothing written" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []
    result = runner.invoke(app, ["compress", FT, "--base", BASE, "--rank", "4", "--out", str(out)])
    assert result.exit_code == 2 and result.output.startswith("Error:") and "Traceback" not in result.output
    assert "module 'model.layers.0.self_attn.q_proj'" in result.output and "5.0e-02" in result.output
    # Negative control: uncorrupted factors pass the same check.
    monkeypatch.setattr(compress_module, "_split", split)
    assert runner.invoke(app, ["compress", FT, "--base", BASE, "--rank", "4", "--out", str(out)]).exit_code == 0


def test_recommend_leaves_unchanged_matrices_out_and_counts_them(pair, tmp_path):
    base, ft, spectra = pair
    ranks = recommend(ft, RankPolicy.create(energy=0.9), base=base)
    assert ranks.attrs["lowrank_audit"]["unchanged"] == ["model.layers.1.mlp.down_proj.weight"]
    assert set(ranks["name"]) == set(spectra) - {"model.layers.1.mlp.down_proj.weight"}
    assert "model.layers.1.mlp.down_proj" not in peft_config(ranks)["target_modules"]
    config = tmp_path / "cfg.json"
    result = runner.invoke(app, ["recommend", str(ft), "--base", str(base), "--peft-config", str(config)])
    assert result.exit_code == 0, result.output
    assert "3 layers" in result.output and "1 unchanged matrices left out" in result.output
    assert len(json.loads(config.read_text())["target_modules"]) == 3
    # A report of the same update says the same.
    report = spectrum(ft, base)
    assert recommend(report, RankPolicy.create(energy=0.9))[["name", "rank"]].equals(ranks[["name", "rank"]])


def test_recommend_energy_and_rank_targets_drive_the_randomized_audit(pair):
    base, ft, spectra = pair
    # 0.995 lies past the report's 0.99: the sketch grows to it instead of failing.
    ranks = recommend(ft, RankPolicy.create(energy=0.995), base=base, method="randomized")
    assert (ranks["rank"] == [energy_rank_of(spectra[n], 0.995) for n in ranks["name"]]).all()
    # A fixed rank past the report's values gets that many, and the energy they hold.
    ranks = recommend(ft, RankPolicy.create(rank=60), base=base, method="randomized")
    for row in ranks.to_dict("records"):
        s = spectra[row["name"]]
        assert row["rank"] == 60
        assert row["energy_kept"] == pytest.approx(np.sum(s[:60] ** 2) / np.sum(s**2), abs=1e-4)
