"""Every command refuses every corrupt, hostile or mismatched checkpoint of :mod:`tests.corpus` the same way:
exit 2, one ``Error:`` line naming the culprit, no traceback, no colour codes, no code run, nothing written.
And two inputs that are not errors: a Hugging Face hub cache snapshot (symlinked shards), and a NaN matrix."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lowrank_audit.cli import app
from tests.corpus import CASES, MARKER, Case

runner = CliRunner()
COMMANDS = ("spectrum", "recommend", "compress", "check")
ENV = {"COLUMNS": "40"}  # narrow on purpose: an error line must not wrap, whatever the terminal width


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working folder: ``check`` finds no pyproject.toml policy (the built-in rules apply), and
    everything a command leaves behind shows up here."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], env=ENV)


def command_args(command: str, ckpt: Path, base: Path | None, out: Path) -> list[object]:
    args: list[object] = [command, ckpt]
    if base is not None:
        args += ["--base", base]
    if command == "compress":
        args += ["--rank", "2", "--out", out]
    return args


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (symlinks not followed): kind, and for files size, mtime and SHA-256."""
    state: dict[str, tuple] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            rel = str(path.relative_to(folder))
            st = path.lstat()
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                state[rel] = ("dir",)
            else:
                state[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def assert_one_error_line(result, *mentions: str) -> str:
    """Exit 2 without a traceback; stderr is exactly one ``Error:`` line holding every mention; no escapes."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}"
    assert "\x1b" not in result.stderr, repr(result.stderr)
    assert "Traceback" not in result.output + result.stderr, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    missing = [m for m in mentions if m not in lines[0]]
    assert not missing, f"{missing} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize(
    ("case", "command"),
    [pytest.param(case, command, id=f"{case.name}-{command}") for case in CASES for command in COMMANDS],
)
def test_corpus(case: Case, command: str, tmp_path: Path, work: Path) -> None:
    folder = tmp_path / "case"
    ckpt, base = case.make(folder)
    before = snapshot(folder)
    out = work / "out"
    result = invoke(*command_args(command, ckpt, base, out))
    problems = []
    try:
        assert_one_error_line(result, *case.mentions)
    except AssertionError as exc:
        problems.append(str(exc))
    # Whatever the message: no payload ran, nothing was written, nothing of the case was touched.
    if (folder / MARKER).exists():
        problems.append("a pickled payload ran")
    if out.exists():
        problems.append("compress left its output")
    if left := sorted(p.name for p in work.iterdir()):
        problems.append(f"left behind in the working folder: {left}")
    if snapshot(folder) != before:
        problems.append("the case's files changed")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------- hub cache layout


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    names = [f"model.layers.{i}.{role}.weight" for i in range(2) for role in ("self_attn.q_proj", "mlp.up_proj")]
    out = {name: torch.randn(12, 8, generator=gen) for name in names}
    out["model.norm.weight"] = torch.ones(8)  # 1-D: skipped in both layouts alike
    return out


def test_hub_cache_snapshot_with_relative_symlinks(tmp_path, work):
    """``models--org--name/snapshots/<commit>/`` holds relative symlinks into ``../../blobs/<sha256>``, as
    huggingface_hub lays it out; the shards resolve outside the snapshot folder and must still be read."""
    t = _model_tensors()
    save_file(t, tmp_path / "whole.safetensors")
    repo = tmp_path / "hub" / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("0123456789abcdef" * 3)[:40]
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    files: dict[str, bytes] = {}
    for shard, members in shards.items():
        save_file({n: t[n] for n in members}, tmp_path / shard)
        files[shard] = (tmp_path / shard).read_bytes()
        (tmp_path / shard).unlink()
        weight_map.update(dict.fromkeys(members, shard))
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    for name, data in files.items():
        blob = blobs / _sha256(data)
        blob.write_bytes(data)
        (snap / name).symlink_to(Path("..", "..", "blobs", blob.name))
    assert all(os.readlink(snap / n).startswith("../../blobs/") for n in files)

    whole = invoke("spectrum", tmp_path / "whole.safetensors", "--json")
    sharded = invoke("spectrum", snap, "--json")
    assert whole.exit_code == 0, whole.output
    assert sharded.exit_code == 0, sharded.output
    rows = json.loads(whole.stdout)["rows"]
    assert len(rows) == 4
    assert sorted(r["name"] for r in json.loads(sharded.stdout)["rows"]) == sorted(r["name"] for r in rows)
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------------------------------- non-finite


def test_nonfinite_matrix_is_reported_gated_and_not_compressed(tmp_path, work):
    gen = torch.Generator().manual_seed(2)
    bad = torch.randn(8, 6, generator=gen)
    bad[3, 2] = math.nan
    ckpt = tmp_path / "nan.safetensors"
    save_file({"w_nan.weight": bad, "w_clean.weight": torch.randn(8, 6, generator=gen)}, ckpt)

    spectrum = invoke("spectrum", ckpt)
    assert spectrum.exit_code == 0, spectrum.output
    assert "w_nan" in spectrum.output

    recommend = invoke("recommend", ckpt)
    assert recommend.exit_code == 0, recommend.output
    assert "w_nan" in recommend.output and "w_clean" in recommend.output
    as_json = invoke("recommend", ckpt, "--json")
    assert as_json.exit_code == 0, as_json.output
    assert "w_nan" in as_json.stdout  # listed somewhere ...
    ranked = {r["name"]: r["rank"] for r in json.loads(as_json.stdout)["rows"]}
    assert ranked.get("w_nan.weight") is None and ranked["w_clean.weight"] >= 1  # ... with no rank

    check = invoke("check", ckpt)  # from an empty folder: the built-in forbid-nonfinite rule
    assert check.exit_code == 1, check.output
    assert "w_nan" in check.output

    out = work / "out"
    compress = invoke("compress", ckpt, "--rank", "2", "--out", out)
    assert_one_error_line(compress, "w_nan")
    assert not out.exists() and list(work.iterdir()) == []


# ------------------------------------------------------------------------------- the corpus is what it says


def test_corpus_files_are_broken_the_way_their_names_say(tmp_path):
    """The generator's own check: the zip cases keep a readable directory, the pickles hold their globals."""
    import pickletools
    import zipfile

    built = {case.name: case.make(tmp_path / case.name)[0] for case in CASES}

    def globals_of(data: bytes) -> set[str]:
        strings, found = [], set()
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.add(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                found.add(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
        return found

    for name, member in (("pt-crc-mismatch", "flipped/data/0"), ("npz-crc-mismatch", "layer0_weight.npy")):
        with zipfile.ZipFile(built[name]) as zf:  # the directory parses; only the CRC of one member fails
            assert member in zf.namelist() and zf.testzip() == member, name
    with zipfile.ZipFile(built["pt-short-record"]) as zf:
        assert zf.testzip() is None and zf.getinfo("shortrec/data/0").file_size == 32  # a 4x4 float32 needs 64
    for name in ("pt-truncated", "npz-truncated"):
        assert not zipfile.is_zipfile(built[name]), name
    header = built["safetensors-duplicate-name"].read_bytes()[8:]
    assert header.count(b'"enc.proj.weight"') == 2
    with zipfile.ZipFile(built["npz-huge-header"]) as zf:
        assert zf.getinfo("layer0_weight.npy").file_size < 256
    with zipfile.ZipFile(built["evil-zip-pt"]) as zf:
        assert "os.makedirs" in globals_of(zf.read("evil/data.pkl"))
    with zipfile.ZipFile(built["evil-exec"]) as zf:
        assert "__builtin__.exec" in globals_of(zf.read("execs/data.pkl"))  # protocol 2 spelling
    assert "builtins.exec" in globals_of(built["evil-exec-protocol4"].read_bytes())
    assert "os.makedirs" in globals_of(built["evil-raw-bin"].read_bytes())
    assert not any((tmp_path / name / MARKER).exists() for name in built)
