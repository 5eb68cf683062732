"""Hub ids resolve to cached snapshot folders, offline; whatever is missing fails naming the cache."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowrank_audit.errors import CheckpointError
from lowrank_audit.io.checkpoint import open_checkpoint
from lowrank_audit.io.hub import cache_root, looks_like_hub_id, resolve

# C_MAIN and C_V1 share their first 8 hex digits: "1a2b3c4" is ambiguous, "1a2b3c4d0" is not.
C_MAIN = "1a2b3c4d0" + "0" * 31
C_V1 = "1a2b3c4d1" + "1" * 31
C_PR = "feedbeef" + "2" * 32
C_OLD = "0123456789abcdef0123456789abcdef01234567"  # a detached snapshot: no ref names it
C_GONE = "9" * 40  # named by a ref, never downloaded
REPO = "org/name"
FOLDER = "models--org--name"
HF_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def _blob(model: Path, data: bytes) -> Path:
    blob = model / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return blob


def _link(model: Path, commit: str, name: str, blob: Path) -> None:
    # As huggingface_hub lays them out: relative symlinks from snapshots/<commit>/<name> into ../../blobs.
    link = model / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)


def _ref(model: Path, name: str, text: str) -> None:
    ref = model / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(text)  # no trailing newline, as huggingface_hub writes them


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A hub cache with org/name at four commits; refs main, dev, v1 and refs/pr/1 (the layout
    huggingface_hub writes for revision "refs/pr/1") plus pr/2, and one detached snapshot."""
    root = tmp_path / "hub"
    model = root / FOLDER
    for commit in (C_MAIN, C_V1, C_PR, C_OLD):
        _link(model, commit, "config.json", _blob(model, f'{{"commit": "{commit}"}}'.encode()))
    for name, commit in {"main": C_MAIN, "dev": C_V1, "v1": C_V1, "refs/pr/1": C_PR, "pr/2": C_PR}.items():
        _ref(model, name, commit)
    return root


def _config_commit(snapshot: Path) -> str:
    return (snapshot / "config.json").read_text().split('"')[3]


@pytest.fixture
def no_hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in HF_VARS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    return home


# cache_root


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, "home/.cache/huggingface/hub"),
        ({"XDG_CACHE_HOME": "xdg"}, "xdg/huggingface/hub"),
        ({"XDG_CACHE_HOME": "xdg", "HF_HOME": "hfhome"}, "hfhome/hub"),
        ({"XDG_CACHE_HOME": "xdg", "HF_HOME": "hfhome", "HUGGINGFACE_HUB_CACHE": "legacy"}, "legacy"),
        (
            {"XDG_CACHE_HOME": "xdg", "HF_HOME": "hfhome", "HUGGINGFACE_HUB_CACHE": "legacy", "HF_HUB_CACHE": "new"},
            "new",
        ),
        ({"HF_HUB_CACHE": "", "HF_HOME": "hfhome"}, "hfhome/hub"),  # empty counts as unset
    ],
)
def test_cache_root_precedence(no_hf_env, tmp_path, monkeypatch, env, want):
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value) if value else "")
    assert cache_root() == tmp_path / want


def test_cache_root_expands_home_and_variables(no_hf_env, monkeypatch):
    monkeypatch.setenv("HF_HOME", "~/hf")
    assert cache_root() == no_hf_env / "hf" / "hub"
    monkeypatch.setenv("WHERE", "/data")
    monkeypatch.setenv("HF_HUB_CACHE", "$WHERE/hub")
    assert cache_root() == Path("/data/hub")


def test_cache_root_matches_huggingface_hub(no_hf_env, tmp_path):
    pytest.importorskip("huggingface_hub")
    cases = [
        {},
        {"XDG_CACHE_HOME": "x"},
        {"XDG_CACHE_HOME": "x", "HF_HOME": "h"},
        {"HF_HOME": "h", "HUGGINGFACE_HUB_CACHE": "l"},
    ]
    cases.append({"HUGGINGFACE_HUB_CACHE": "l", "HF_HUB_CACHE": "n"})
    code = "import os, huggingface_hub.constants as c; print(os.path.abspath(c.HF_HUB_CACHE))"
    for case in cases:
        env = {k: v for k, v in os.environ.items() if k not in HF_VARS}
        env.update({k: str(tmp_path / v) for k, v in case.items()})
        theirs = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in case.items():
                mp.setenv(k, str(tmp_path / v))
            assert str(cache_root()) == theirs.stdout.strip(), case


# resolve: what is found


def test_resolve_defaults_to_main_in_the_env_cache(cache, no_hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = resolve(REPO)
    assert snapshot == cache / FOLDER / "snapshots" / C_MAIN
    assert _config_commit(snapshot) == C_MAIN  # read through the relative symlink into blobs/


@pytest.mark.parametrize(
    ("revision", "commit"),
    [
        ("main", C_MAIN),
        ("dev", C_V1),  # a branch
        ("v1", C_V1),  # a tag: same refs/ folder
        ("refs/pr/1", C_PR),  # a pull request, nested as huggingface_hub writes it: refs/refs/pr/1
        ("pr/2", C_PR),  # a nested name straight under refs/
        (C_OLD, C_OLD),  # a full hash, detached
        (C_V1.upper(), C_V1),
        ("1a2b3c4d0", C_MAIN),  # a unique prefix
        ("feedbee", C_PR),  # the shortest accepted prefix
        ("0123456", C_OLD),
    ],
)
def test_resolve_revisions(cache, revision, commit):
    snapshot = resolve(REPO, revision, cache=cache)
    assert snapshot == cache / FOLDER / "snapshots" / commit
    assert _config_commit(snapshot) == commit


def test_resolve_without_org_and_with_a_hand_edited_ref(tmp_path):
    model = tmp_path / "models--gpt2"
    _link(model, C_MAIN, "config.json", _blob(model, b"{}"))
    _ref(model, "main", C_MAIN + "\n")  # trailing whitespace from an editor is forgiven
    assert resolve("gpt2", cache=tmp_path) == model / "snapshots" / C_MAIN


def test_refs_win_over_hashes(cache):
    # As in huggingface_hub: a ref named like a commit prefix is read first.
    _ref(cache / FOLDER, "0123456", C_MAIN)
    assert resolve(REPO, "0123456", cache=cache).name == C_MAIN


# resolve: what fails


def test_missing_model_names_the_cache_and_folder(cache, no_hf_env, monkeypatch):
    with pytest.raises(CheckpointError) as err:
        resolve("org/other", cache=cache)
    msg = str(err.value)
    assert f"model 'org/other' is not in the Hugging Face cache at {cache} (looked for models--org--other)" in msg
    assert "never downloads" in msg and "`hf download org/other`" in msg and "\n" not in msg
    # The same with the default cache, which does not even exist.
    with pytest.raises(CheckpointError, match="at .*home/.cache/huggingface/hub \\(looked for models--gpt2\\)"):
        resolve("gpt2", "v1")


def test_unknown_revision_lists_the_known_ones(cache):
    for revision in ("v2", "abcdef0", "1a2b3c", "f" * 40):  # a name, hex prefixes matching nothing, a full hash
        with pytest.raises(CheckpointError) as err:
            resolve(REPO, revision, cache=cache)
        msg = str(err.value)
        assert f"model 'org/name' has no revision '{revision}' in the cache at {cache}" in msg
        # Refs, then every snapshot in git's shortest unique abbreviation (C_MAIN and C_V1 need 9 digits).
        assert "(known: dev, main, pr/2, refs/pr/1, v1, 012345678, 1a2b3c4d0, 1a2b3c4d1, feedbeef2)" in msg
        assert f"`hf download org/name --revision {revision}`" in msg and "\n" not in msg


def test_unknown_revision_with_nothing_cached(tmp_path):
    (tmp_path / FOLDER).mkdir()
    with pytest.raises(CheckpointError, match=r"has no revision 'main' .*\(known: none\)"):
        resolve(REPO, cache=tmp_path)


def test_ambiguous_prefix_lists_the_candidates(cache):
    with pytest.raises(CheckpointError) as err:
        resolve(REPO, "1a2b3c4", cache=cache)
    msg = str(err.value)
    assert f"revision '1a2b3c4' is ambiguous in the cache at {cache}" in msg
    assert f"commits {C_MAIN}, {C_V1}; give more hex digits" in msg


@pytest.mark.parametrize("text", ["not a hash", C_MAIN[:39], C_MAIN.upper(), C_MAIN + "0", "", C_MAIN * 10])
def test_refs_file_with_garbage(cache, text):
    _ref(cache / FOLDER, "v1", text)
    with pytest.raises(CheckpointError) as err:
        resolve(REPO, "v1", cache=cache)
    msg = str(err.value)
    assert f"model 'org/name': refs/v1 in the cache at {cache} holds " in msg
    assert "not a 40-hex commit hash; lowrank-audit never downloads: refetch it with" in msg
    assert len(msg) < 400  # a huge ref is shown cut short


def test_ref_leading_outside_the_cache_is_not_read(cache, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.write_text(C_MAIN)
    ref = cache / FOLDER / "refs" / "main"
    ref.unlink()
    ref.symlink_to(outside)
    with pytest.raises(CheckpointError, match=rf"refs/main in the cache at .* leads outside {FOLDER}/refs \(to "):
        resolve(REPO, cache=cache)


def test_snapshot_folder_missing(cache):
    _ref(cache / FOLDER, "v2", C_GONE)
    with pytest.raises(CheckpointError) as err:
        resolve(REPO, "v2", cache=cache)
    msg = str(err.value)
    assert f"revision 'v2' is commit {C_GONE} (refs/v2), but its snapshot folder" in msg
    assert f"{FOLDER}/snapshots/{C_GONE} is missing from the cache at {cache}" in msg
    assert "`hf download org/name --revision v2`" in msg


@pytest.mark.parametrize("revision", ["../main", "refs/../../x", "/etc/passwd", "a//b", "", "a\\b", "ma\nin"])
def test_revision_names_cannot_leave_refs(cache, revision):
    with pytest.raises(CheckpointError, match="is not a revision name"):
        resolve(REPO, revision, cache=cache)


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "../x", "org/", "a--b", "x..y", "-x", "x.", "spa ce"])
def test_invalid_model_ids(cache, repo_id):
    with pytest.raises(CheckpointError, match="is not a Hugging Face model id"):
        resolve(repo_id, cache=cache)


# looks_like_hub_id


@pytest.mark.parametrize("text", ["gpt2", "org/name", "Qwen/Qwen2.5-0.5B", "bert-base-uncased", "a_b/c.d", "_x/y_"])
def test_looks_like_hub_id(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/abs/model",
        "./model",
        "~/model",
        "../model",
        ".hidden",
        "a/b/c",
        "org/",
        "/name",
        "model.safetensors",
        "org/model.bin",
        "weights.PT",
        "x.pth",
        "a.npz",
        "report.parquet",
        "model.safetensors.index.json",
        "a--b/c",
        "a/b..c",
        "-x",
        "x-",
        "with space",
        "org\\name",
        "x" * 97,
    ],
)
def test_does_not_look_like_hub_id(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_hub_id(text)


def test_an_existing_local_path_is_never_a_hub_id(tmp_path, monkeypatch):
    # looks_like_hub_id handles this itself: callers may pass it any argument.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_bytes(b"")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert not looks_like_hub_id("gpt2") and not looks_like_hub_id("org/name") and not looks_like_hub_id("dangling")
    assert looks_like_hub_id("gpt3") and looks_like_hub_id("org/other")


# The snapshot is a model folder the reader opens; nothing touches the network or huggingface_hub.


def test_resolved_snapshot_opens_as_a_checkpoint(cache, tmp_path):
    tensors = {"layer.0.weight": torch.arange(12.0).reshape(3, 4), "layer.0.bias": torch.ones(3)}
    staged = tmp_path / "staged.safetensors"
    save_file(tensors, staged)
    model = cache / FOLDER
    _link(model, C_V1, "model.safetensors", _blob(model, staged.read_bytes()))
    with open_checkpoint(resolve(REPO, "v1", cache=cache)) as ckpt:
        assert list(ckpt) == sorted(tensors)
        assert ckpt.info("layer.0.weight").shape == (3, 4)
        assert torch.equal(ckpt["layer.0.weight"], tensors["layer.0.weight"])


def test_offline_and_without_huggingface_hub(cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resolve opened a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    assert resolve(REPO, cache=cache).name == C_MAIN
    code = (
        "import sys; from lowrank_audit.io.hub import resolve; "
        f"resolve({REPO!r}, cache={str(cache)!r}); "
        "assert 'huggingface_hub' not in sys.modules, 'imported huggingface_hub'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# the command line


def test_commands_take_a_hub_id_and_a_revision(cache, no_hf_env, monkeypatch, tmp_path):
    """`spectrum org/name --revision v1` audits the cached snapshot; without the model in the
    cache, exit 2 naming the cache folder; --revision with a local path is refused."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from lowrank_audit.cli import app

    model = cache / FOLDER
    weights = tmp_path / "w.safetensors"
    save_file({"layer.weight": torch.ones(4, 3), "other.weight": torch.eye(5)}, weights)
    _link(model, C_V1, "model.safetensors", _blob(model, weights.read_bytes()))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    found = runner.invoke(app, ["spectrum", REPO, "--revision", "v1", "--json"])
    assert found.exit_code == 0, found.output
    assert sorted(r["name"] for r in json.loads(found.stdout)["rows"]) == ["layer.weight", "other.weight"]
    at_main = runner.invoke(app, ["spectrum", REPO])  # main's snapshot holds no weights
    assert at_main.exit_code == 2 and "no checkpoint in folder" in at_main.stderr
    absent = runner.invoke(app, ["recommend", "org/absent"])
    assert absent.exit_code == 2 and f"not in the Hugging Face cache at {cache}" in absent.stderr
    assert "models--org--absent" in absent.stderr and len(absent.stderr.strip().splitlines()) == 1
    local = runner.invoke(app, ["check", str(weights), "--revision", "v1"])
    assert local.exit_code == 2 and "--revision v1 applies to a model named by hub id" in local.stderr
