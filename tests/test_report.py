"""The Parquet schema is stable, round-trips exactly, and is written atomically."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_audit.errors import CheckpointError, OptionError
from lowrank_audit.formats.report import COLUMNS, build_frame, read_report, write_report
from lowrank_audit.io.outputs import check_target

PINNED = {
    "name": "string", "module": "string", "layer": "int64", "role": "string", "kind": "string", "expert": "int64",
    "shape": "list<item: int64>", "rows": "int64", "cols": "int64", "dtype": "string", "numel": "int64",
    "frobenius_norm": "double", "spectral_norm": "double", "nuclear_norm": "double", "stable_rank": "double",
    "effective_rank": "double", "numerical_rank": "int64", "k90": "int64", "k95": "int64", "k99": "int64",
    "k90_lo": "int64", "k90_hi": "int64", "k95_lo": "int64", "k95_hi": "int64", "k99_lo": "int64",
    "k99_hi": "int64", "k95_ratio": "double", "signal_rank": "int64", "noise_sigma": "double",
    "noise_share": "double", "precision_floor": "double", "condition_number": "double",
    "adapter_rank": "int64", "adapter_scale": "double", "adapter_usage": "double",
    "factor_norm_ratio": "double", "factor_imbalance": "double",
    "base_angle": "double", "intruder_dimensions": "int64",
    "nonfinite": "int64",
    "method": "string", "k": "int64", "singular_values": "list<item: double>",
}  # fmt: skip


def test_schema_is_pinned():
    """Renaming, retyping or reordering a column breaks users' queries: change it here on purpose."""
    assert {name: str(dtype) for name, dtype, _ in COLUMNS} == PINNED
    assert [name for name, _, _ in COLUMNS] == list(PINNED)


def test_readme_documents_every_column():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, dtype, meaning in COLUMNS:
        assert f"| `{name}` | {dtype} | {meaning} |" in readme, name


def _row(**over):
    row = {name: None for name, _, _ in COLUMNS}
    row.update(name="a.weight", module="a", role="a", kind="weight", shape=[3, 2], rows=3, cols=2, dtype="float32",
               numel=6, nonfinite=0, method="exact", k=2, singular_values=[2.0, 1.0], k95=2,
               condition_number=float("inf"))  # fmt: skip
    row.update(over)
    return row


def test_round_trip_keeps_values_nulls_and_metadata(tmp_path):
    meta = {"tool_version": "x", "skipped": {"b": "1-D"}}
    frame = build_frame([_row(), _row(name="b.weight", layer=3, expert=1, k95=None, singular_values=None)], meta)
    path = write_report(frame, tmp_path / "sub" / "r.parquet")
    back = read_report(path)
    pd.testing.assert_frame_equal(back, frame)
    assert back.attrs["lowrank_audit"] == meta
    assert back["k95"].isna().tolist() == [False, True]  # null stays null, never NaN or 0
    assert back["condition_number"][0] == float("inf")
    assert pq.read_schema(path).metadata[b"lowrank_audit"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.parquet"]  # no temporary left


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=0, max_size=5),
    layer=st.none() | st.integers(0, 1000),
    k95=st.none() | st.integers(0, 10**6),
)
def test_round_trip_property(tmp_path_factory, values, layer, k95):
    frame = build_frame([_row(singular_values=sorted(values, reverse=True), layer=layer, k95=k95)], {"v": 1})
    back = read_report(write_report(frame, tmp_path_factory.mktemp("rt") / "r.parquet"))
    pd.testing.assert_frame_equal(back, frame)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    frame = build_frame([_row()], {})
    target = tmp_path / "r.parquet"
    target.write_bytes(b"previous report")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(frame, target, force=True)
    assert target.read_bytes() == b"previous report"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]


def test_read_report_rejects_other_parquet(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(CheckpointError, match="not a lowrank-audit report"):
        read_report(tmp_path / "other.parquet")
    with pytest.raises(CheckpointError, match="cannot read Parquet report"):
        read_report(tmp_path / "absent.parquet")


def test_output_may_not_be_an_input(tmp_path, samples):
    with pytest.raises(OptionError, match="would overwrite input"):
        check_target(samples / "base.safetensors", [samples / "base.safetensors"])
    with pytest.raises(OptionError, match="would overwrite input"):
        check_target(samples / "base-sharded" / "r.parquet", [samples / "base-sharded"])
    with pytest.raises(OptionError, match="is a folder"):
        check_target(tmp_path, [samples / "base.safetensors"])
    check_target(tmp_path / "r.parquet", [samples / "base.safetensors"])  # fine


def test_a_report_of_an_earlier_version_reads_with_the_new_columns_null(tmp_path):
    frame = build_frame([_row(k90_lo=1, noise_sigma=0.5)], {"tool_version": "0.x"})
    path = write_report(frame, tmp_path / "new.parquet")
    table = pq.read_table(path)
    older = table.drop_columns(["k90_lo", "noise_sigma", "precision_floor"])
    pq.write_table(older, tmp_path / "old.parquet")
    back = read_report(tmp_path / "old.parquet")
    assert list(back.columns) == [name for name, _, _ in COLUMNS]
    assert back["k90_lo"].isna().all() and back["noise_sigma"].isna().all() and back["k95"][0] == 2
    # Negative control: a column out of order is not an older report, it is another file.
    reordered = table.select(["module", "name", *table.schema.names[2:]])
    pq.write_table(reordered, tmp_path / "other.parquet")
    with pytest.raises(CheckpointError, match="not a lowrank-audit report"):
        read_report(tmp_path / "other.parquet")
