"""`plot`: the data each figure shows equals its report's; every report kind draws a picture."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lowrank_audit.analyses.plot import plot_data, read_any
from lowrank_audit.cli import app

pytest.importorskip("matplotlib")
SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
FT, BASE = str(SAMPLES / "finetuned.safetensors"), str(SAMPLES / "base.safetensors")
runner = CliRunner()
MAGIC = {".png": b"\x89PNG", ".svg": b"<?xml", ".pdf": b"%PDF"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reports")
    made = {
        "spectrum": ["spectrum", FT, "--base", BASE, "--out", str(folder / "spectrum.parquet")],
        "trajectory": ["trajectory", str(SAMPLES / "dmf" / "step-*.safetensors"), "-o", str(folder / "traj.parquet")],
        "compress": ["compress", FT, "--base", BASE, "--rank", "4", "--out", str(folder / "adapter")],
        "ranks": ["recommend", FT, "--base", BASE, "--out", str(folder / "ranks.parquet")],
        "activations": ["activations", str(SAMPLES / "dropout" / "activations-dropout.safetensors"), "--out",
                        str(folder / "acts.parquet")],
    }  # fmt: skip
    for args in made.values():
        result = runner.invoke(app, [*args, "-q"])
        assert result.exit_code == 0, result.output
    return {"spectrum": folder / "spectrum.parquet", "trajectory": folder / "traj.parquet",
            "compress": folder / "adapter" / "compress-report.parquet", "ranks": folder / "ranks.parquet",
            "activations": folder / "acts.parquet"}  # fmt: skip


def _data(*paths: Path, layers=None):
    return plot_data([(str(p), *read_any(p)) for p in paths], layers)


def test_spectrum_curves_and_heatmap_are_the_report_s(reports):
    kind, frame = read_any(reports["spectrum"])
    data = _data(reports["spectrum"])
    assert kind == "spectrum" and len(data.curves) == 1
    (curves,) = data.curves.values()
    assert len(curves) == len(frame)
    for row in frame.to_dict("records"):
        s = np.asarray(row["singular_values"])
        np.testing.assert_array_equal(curves[row["name"]], s / s[0])
    layers, roles, grid = data.heatmap
    for row in frame[frame["layer"].notna()].to_dict("records"):
        assert grid[layers.index(row["layer"]), roles.index(row["role"])] == row["k95"]


def test_trajectory_curves_and_settling_are_the_report_s(reports):
    _, frame = read_any(reports["trajectory"])
    data = _data(reports["trajectory"], layers="layers.0*")
    rows = frame[frame["name"] == "layers.0.weight"]
    sigma = data.curves["singular values"]
    for i in range(3):
        np.testing.assert_array_equal(sigma[f"σ{i + 1}"], [s[i] for s in rows["singular_values"]])
    np.testing.assert_array_equal(data.curves["angles (degrees)"]["top-r subspace to last"], rows["subspace_angle"])
    assert data.marks["angles (degrees)"] == rows["settling_step"].iloc[0]


def test_compress_and_ranks_bars_are_the_report_s(reports):
    _, frame = read_any(reports["compress"])
    data = _data(reports["compress"])
    ranked = frame[frame["rank"].notna()]
    assert data.bars["rank"][0] == list(ranked["name"]) and (data.bars["rank"][1] == 4).all()
    np.testing.assert_array_equal(data.bars["energy kept"][1], ranked["energy_kept"])
    _, ranks = read_any(reports["ranks"])
    np.testing.assert_array_equal(_data(reports["ranks"]).bars["rank"][1], ranks["rank"])


def test_activations_beside_weights(reports):
    data = _data(reports["activations"], reports["spectrum"])
    assert len(data.curves) == 2


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
@pytest.mark.parametrize("kind", ["spectrum", "trajectory", "compress", "ranks", "activations"])
def test_every_report_kind_draws_a_picture(reports, tmp_path, kind, suffix):
    out = tmp_path / f"{kind}{suffix}"
    result = runner.invoke(app, ["plot", str(reports[kind]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(MAGIC[suffix]) and out.stat().st_size > 1000


def test_refusals(reports, tmp_path, monkeypatch):
    wrong = runner.invoke(app, ["plot", str(reports["ranks"]), "--out", str(tmp_path / "x.jpg")])
    assert wrong.exit_code == 2 and ".png, .svg, .pdf" in wrong.stderr
    nothing = runner.invoke(
        app, ["plot", str(reports["spectrum"]), "--layers", "nope*", "--out", str(tmp_path / "x.png")]
    )
    assert nothing.exit_code == 2 and "matches no row" in nothing.stderr
    mixed = runner.invoke(
        app, ["plot", str(reports["ranks"]), str(reports["spectrum"]), "--out", str(tmp_path / "x.png")]
    )
    assert mixed.exit_code == 2 and "several spectrum reports" in mixed.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    missing = runner.invoke(app, ["plot", str(reports["ranks"]), "--out", str(tmp_path / "y.png")])
    assert missing.exit_code == 2 and "pip install 'lowrank-audit[plot]'" in missing.stderr
    assert list(tmp_path.iterdir()) == []
