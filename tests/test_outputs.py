"""Every file the tool writes: refused if it exists (exit 2, nothing touched) unless --force,
replaced with it, mode 0644 under umask 022, and reports that every Parquet reader reads alike."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from lowrank_audit.cli import app
from lowrank_audit.errors import OptionError
from lowrank_audit.formats.report import build_frame, read_report, write_report
from lowrank_audit.io.outputs import atomic_file, atomic_folder, write_text
from tests.conftest import SAMPLES

runner = CliRunner()
FT, BASE = str(SAMPLES / "finetuned.safetensors"), str(SAMPLES / "base.safetensors")
OLD = b"an earlier file the user wants to keep\n"


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# (command before the output option, the option); the target is appended after the option.
WRITERS = [
    (["spectrum", FT, "-q"], "--out"),
    (["recommend", FT, "--base", BASE, "-q"], "--out"),
    (["recommend", FT, "--base", BASE, "-q"], "--peft-config"),
    (["check", FT, "-q"], "--out"),
    (["check", FT, "-q"], "--junit"),
    (["check", FT, "-q"], "--markdown"),
    (["expand", "FACTORIZED"], "--out"),
]


@pytest.fixture(scope="module")
def factorized(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fact") / "lowrank"
    result = runner.invoke(app, ["compress", FT, "--rank", "4", "--out", str(folder), "-q"])
    assert result.exit_code == 0, result.output
    return folder


@pytest.mark.parametrize(("args", "option"), WRITERS, ids=[f"{a[0]} {o}" for a, o in WRITERS])
def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path, umask_022, factorized, args, option):
    args = [str(factorized) if a == "FACTORIZED" else a for a in args]
    target = tmp_path / f"out{option.replace('-', '_')}"
    target.write_bytes(OLD)
    refused = runner.invoke(app, [*args, option, str(target)])
    assert refused.exit_code == 2, refused.output
    error = refused.stderr.strip()
    assert error.startswith("Error: ") and str(target) in error and "--force" in error and "\n" not in error
    assert target.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left behind

    replaced = runner.invoke(app, [*args, option, str(target), "--force"])
    assert replaced.exit_code in (0, 1), replaced.output  # check may fail its gate; the file is written anyway
    assert target.read_bytes() != OLD and target.stat().st_size > 0
    assert _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_compress_folder_is_refused_without_force_and_replaced_with_it(tmp_path, umask_022):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_bytes(OLD)
    refused = runner.invoke(app, ["compress", FT, "--base", BASE, "--rank", "2", "--out", str(out), "-q"])
    assert refused.exit_code == 2 and "--force" in refused.stderr, refused.output
    assert (out / "keep.txt").read_bytes() == OLD
    replaced = runner.invoke(app, ["compress", FT, "--base", BASE, "--rank", "2", "--out", str(out), "-q", "-f"])
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "keep.txt").exists()
    assert _mode(out) == 0o755 and all(_mode(p) == 0o644 for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_library_writers_follow_the_same_rule(tmp_path, umask_022):
    path = tmp_path / "notes.txt"
    write_text(path, "first")
    with pytest.raises(OptionError, match="exists; use --force"):
        write_text(path, "second")
    assert path.read_text() == "first"
    write_text(path, "second", force=True)
    assert path.read_text() == "second" and _mode(path) == 0o644
    with pytest.raises(RuntimeError, match="half-way"), atomic_file(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("failed half-way")
    with pytest.raises(RuntimeError, match="half-way"), atomic_folder(tmp_path / "folder") as tmp:
        (tmp / "a").write_bytes(b"partial")
        raise RuntimeError("failed half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_umask_077_is_respected(tmp_path):
    previous = os.umask(0o077)
    try:
        write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "private.txt") == 0o600  # the negative control of the 0644 checks


def _report(tmp_path: Path) -> Path:
    path = tmp_path / "r.parquet"
    result = runner.invoke(app, ["spectrum", str(SAMPLES / "synthetic.safetensors"), "-o", str(path), "-q"])
    assert result.exit_code == 0, result.output
    return path


def test_plain_read_parquet_restores_nullable_integers(tmp_path):
    path = _report(tmp_path)
    plain = pd.read_parquet(path)
    for column in ("layer", "expert", "k95", "signal_rank", "rows"):
        assert str(plain[column].dtype) == "Int64", column
    assert plain["expert"].isna().sum() == 4  # four plain matrices, then four experts
    assert plain["expert"].dropna().tolist() == [0, 1, 2, 3]
    ours = read_report(path)
    pd.testing.assert_frame_equal(plain, ours, check_dtype=False)
    assert list(plain.columns) == list(ours.columns)


def test_duckdb_and_polars_read_the_same_report(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    path = _report(tmp_path)
    ours = read_report(path)
    via_duckdb = duckdb.sql(f"SELECT name, expert, k95, singular_values FROM '{path}'").df()
    via_polars = pl.read_parquet(path).select("name", "expert", "k95", "singular_values")
    assert via_duckdb["name"].tolist() == via_polars["name"].to_list() == ours["name"].tolist()
    assert via_polars["expert"].dtype == pl.Int64 and via_polars["k95"].to_list() == ours["k95"].tolist()
    assert [None if pd.isna(v) else int(v) for v in via_duckdb["k95"]] == ours["k95"].tolist()
    first = ours["singular_values"].iloc[0]
    assert list(via_duckdb["singular_values"].iloc[0]) == list(first) == via_polars["singular_values"][0].to_list()


def test_a_report_without_pandas_metadata_still_reads(tmp_path):
    # Reports written before pandas metadata was kept read back the same through read_report.
    import pyarrow.parquet as pq

    path = _report(tmp_path)
    table = pq.read_table(path)
    stripped = table.replace_schema_metadata({b"lowrank_audit": table.schema.metadata[b"lowrank_audit"]})
    pq.write_table(stripped, tmp_path / "old.parquet")
    assert str(pd.read_parquet(tmp_path / "old.parquet")["layer"].dtype) == "float64"  # the old behaviour
    assert str(read_report(tmp_path / "old.parquet")["layer"].dtype) == "Int64"


def test_write_report_round_trip_keeps_provenance(tmp_path):
    frame = build_frame([], {"command": "x"})
    write_report(frame, tmp_path / "empty.parquet")
    assert read_report(tmp_path / "empty.parquet").attrs["lowrank_audit"] == {"command": "x"}


LONG = "model.language_model.encoder.layers.10.self_attention.linear_query_key_value_projection_for_heads"


def test_piped_tables_keep_long_module_names_whole(tmp_path):
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    save_file({f"{LONG}.weight": torch.randn(40, 24, generator=gen)}, tmp_path / "long.safetensors")
    assert len(LONG) > 80
    for command in (
        ["spectrum", str(tmp_path / "long.safetensors")],
        ["recommend", str(tmp_path / "long.safetensors")],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "lowrank_audit", *command], capture_output=True, text=True, check=True,
            env={**os.environ, "COLUMNS": "80"},
        )  # fmt: skip
        rows = [line for line in done.stdout.splitlines() if LONG in line]
        assert len(rows) == 1, done.stdout  # the name, whole, on one line with its figures
        assert rows[0].split()[0] == LONG and len(rows[0].split()) > 3
