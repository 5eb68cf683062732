"""``activations``: spectra of streamed moments equal the float64 SVD of the stacked rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import lowrank_audit.io.activations as acts
from lowrank_audit.analyses.activations import activations
from lowrank_audit.cli import app
from lowrank_audit.formats.report import read_report
from lowrank_audit.io.activations import Moments, write_moments

# σ from float64 eigenvalues of XᵀX: |σ_i - σ_ref_i| <= c sqrt(eps64) σ_1 with c of order 1
# (sqrt(eps64) = 1.5e-8); measured up to 2e-8 here. Stated tolerance: 1e-6 of σ_1.
GRAM_SV_ATOL = 1e-6


def _x(n: int, d: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * decay ** torch.arange(d, dtype=torch.float64)


def _svd(x: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(x.reshape(-1, x.shape[-1]).numpy(), compute_uv=False)


def _assert_close(got, want) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= GRAM_SV_ATOL * want[0]


def _spectrum(frame, module: str) -> list[float]:
    return frame.set_index("name").loc[module, "singular_values"]


@pytest.mark.parametrize(("n", "d"), [(500, 24), (10, 24)], ids=["N>>d", "N<d"])
def test_moments_spectrum_equals_the_svd_of_the_rows(tmp_path, n, d):
    x = _x(n, d, 0)
    save_file({"layer.proj": x.float()}, tmp_path / "dump.safetensors")
    frame = activations([tmp_path / "dump.safetensors"], device="cpu")
    row = frame.iloc[0]
    assert (row["kind"], row["rows"], row["cols"], row["k"]) == ("activation", n, d, min(n, d))
    _assert_close(_spectrum(frame, "layer.proj"), _svd(x.float().double()))


def test_three_d_dumps_in_shards_and_small_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(acts, "CHUNK_BYTES", 8 * 16 * 5)
    a, b = _x(4 * 7, 16, 1).reshape(4, 7, 16), _x(33, 16, 2)
    save_file({"m": a.float()}, tmp_path / "part-1.safetensors")
    save_file({"m": b.float()}, tmp_path / "part-2.safetensors")
    frame = activations([tmp_path / "part-1.safetensors", tmp_path / "part-2.safetensors"], device="cpu")
    stacked = torch.cat([a.reshape(-1, 16), b]).float().double()
    assert frame.iloc[0]["rows"] == 61
    _assert_close(_spectrum(frame, "m"), _svd(stacked))
    # Negative control: one shard's spectrum is not the stacked rows'.
    alone = activations([tmp_path / "part-2.safetensors"], device="cpu")
    with pytest.raises(AssertionError):
        _assert_close(_spectrum(alone, "m"), _svd(stacked))


def test_center_is_the_svd_of_the_centered_rows(tmp_path):
    x = _x(200, 12, 3) + 5.0
    m = Moments.empty("m", 12)
    m.add(x)
    write_moments([m], tmp_path / "moments.safetensors")
    centered = activations([tmp_path / "moments.safetensors"], center=True, device="cpu")
    _assert_close(_spectrum(centered, "m"), _svd(x - x.mean(0)))
    raw = activations([tmp_path / "moments.safetensors"], device="cpu")
    _assert_close(_spectrum(raw, "m"), _svd(x))
    assert abs(_spectrum(raw, "m")[0] - _svd(x - x.mean(0))[0]) > 100 * GRAM_SV_ATOL * _svd(x)[0]


def test_nonfinite_rows_are_reported_and_the_module_not_decomposed(tmp_path):
    x = _x(20, 8, 4).float()
    x[5, 2] = float("inf")
    save_file({"bad": x, "good": _x(20, 8, 5).float()}, tmp_path / "d.safetensors")
    frame = activations([tmp_path / "d.safetensors"], device="cpu").set_index("name")
    assert frame.loc["bad", "nonfinite"] == 1 and frame.loc["bad", "method"] == "skipped"
    assert frame.loc["good", "nonfinite"] == 0 and frame.loc["good", "method"] == "exact"


def test_cli_writes_a_report_that_check_reads(tmp_path, samples):
    runner = CliRunner()
    dump = samples / "dropout" / "activations-dropout.safetensors"
    out = tmp_path / "acts.parquet"
    result = runner.invoke(app, ["activations", str(dump), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Most low-rank activations" in result.stdout and "fc2" in result.stdout
    report = read_report(out)
    assert set(report["kind"]) == {"activation"} and list(report["name"]) == ["fc1", "fc2"]
    checked = runner.invoke(app, ["check", str(out), "--policy", str(_policy(tmp_path))])
    assert checked.exit_code == 1, checked.output  # fc2's k95 of 12 breaks a floor of 20
    assert "fc2" in checked.stdout


def _policy(tmp_path):
    path = tmp_path / "gate.toml"
    path.write_text('[[rule]]\ncolumn = "k95"\nmin = 20\n')
    return path


def test_bad_activation_input_is_one_line_exit_2(tmp_path):
    save_file({"m": torch.arange(6).reshape(2, 3)}, tmp_path / "ints.safetensors")
    result = CliRunner().invoke(app, ["activations", str(tmp_path / "ints.safetensors")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ints.safetensors: tensor 'm' is not activations" in lines[0]


def test_numerical_and_signal_rank_do_not_collapse_with_many_rows(tmp_path):
    # The same distribution seen over 4,000 rows and over 10^8 (moments scaled by 25,000):
    # the Gram's rounding does not grow with N, so neither may the numerical-rank cut-off.
    x = _x(4000, 16, 6, decay=0.7)
    small = Moments.empty("m", 16)
    small.add(x)
    big = Moments("m", small.xtx * 25_000, small.total * 25_000, small.count * 25_000)
    write_moments([small], tmp_path / "small.safetensors")
    write_moments([big], tmp_path / "big.safetensors")
    rows = [activations([tmp_path / f], device="cpu").iloc[0] for f in ("small.safetensors", "big.safetensors")]
    assert rows[1]["rows"] == 10**8
    assert rows[0]["numerical_rank"] == rows[1]["numerical_rank"] == 16
    assert rows[0]["signal_rank"] == rows[1]["signal_rank"] > 0
    assert rows[0]["k95"] == rows[1]["k95"]


def test_no_rows_is_one_line_exit_2(tmp_path):
    save_file({"m": torch.zeros(0, 4)}, tmp_path / "empty.safetensors")
    result = CliRunner().invoke(app, ["activations", str(tmp_path / "empty.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: {tmp_path / 'empty.safetensors'}: module 'm' has no activation rows"
