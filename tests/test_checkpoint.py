"""Every reader gives the same tensors; bad files fail with CheckpointError naming the file."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank_audit.errors import CheckpointError
from lowrank_audit.io.checkpoint import open_checkpoint
from tests.conftest import RunsCode

FORMATS = [
    "finetuned.safetensors",
    "finetuned-sharded",
    "finetuned.bin",
    "finetuned-sharded/model.safetensors.index.json",
]


@pytest.mark.parametrize("source", FORMATS)
def test_every_format_reads_the_same_tensors(samples, source):
    want = load_file(samples / "finetuned.safetensors")
    with open_checkpoint(samples / source) as ckpt:
        assert list(ckpt) == sorted(want)
        for name, tensor in want.items():
            assert ckpt.info(name).shape == tuple(tensor.shape)
            assert ckpt.info(name).dtype == "float32"
            assert torch.equal(ckpt[name], tensor), name


def test_sharded_folder_lists_index_and_shards_for_provenance(samples):
    with open_checkpoint(samples / "base-sharded") as ckpt:
        names = [f.name for f in ckpt.files]
    assert names == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_npz_and_bf16_and_nested_state_dicts(samples, tmp_path):
    with open_checkpoint(samples / "synthetic.npz") as npz, open_checkpoint(samples / "synthetic.safetensors") as st:
        assert list(npz) == list(st)
        for name in st:
            assert npz.info(name).shape == st.info(name).shape and npz.info(name).dtype == st.info(name).dtype
            assert torch.equal(npz[name], st[name])
    with open_checkpoint(samples / "finetuned-bf16.safetensors") as ckpt:
        assert ckpt.info("lm_head.weight").dtype == "bfloat16" and ckpt["lm_head.weight"].dtype == torch.bfloat16
    # Training scripts often save {"model": state_dict, "step": 10}: names are dotted, non-tensors skipped.
    torch.save({"model": {"a.weight": torch.ones(3, 2)}, "step": 10}, tmp_path / "nested.pt")
    with open_checkpoint(tmp_path / "nested.pt") as ckpt:
        assert list(ckpt) == ["model.a.weight"]


def test_hf_folder_with_bin_index(samples, tmp_path):
    tensors = load_file(samples / "base.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:]), start=1):
        torch.save({n: tensors[n] for n in part}, tmp_path / f"pytorch_model-0000{i}-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 if n in names[:half] else 2}-of-00002.bin" for n in names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path) as ckpt:
        assert list(ckpt) == names and torch.equal(ckpt["lm_head.weight"], tensors["lm_head.weight"])


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2, 2), "payload": RunsCode(str(marker))}, path)
    with pytest.raises(
        CheckpointError, match=r"evil\.bin: refused to unpickle os\.makedirs.*convert it to \.safetensors"
    ):
        open_checkpoint(path)
    assert not marker.exists()
    # Control: an unrestricted unpickler would indeed have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_raw_pickle_file_is_refused(tmp_path):
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"w": np.ones((2, 2))}))
    with pytest.raises(CheckpointError, match="raw.pt"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "shorter than the 8-byte header length"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not valid JSON"),
        (b"\xff" * 16, "corrupt safetensors header length"),
    ],
)
def test_garbled_safetensors(tmp_path, content, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: .*{reason}"):
        open_checkpoint(path)


def test_truncated_safetensors(samples):
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: .*truncated file"):
        open_checkpoint(samples / "truncated.safetensors")


def test_missing_unknown_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint(tmp_path / "absent.safetensors")
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format '\.h5'"):
        open_checkpoint(tmp_path / "weights.h5")
    with pytest.raises(CheckpointError, match="no checkpoint in folder"):
        open_checkpoint(tmp_path)


def test_shard_outside_its_folder_is_refused(samples, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(samples / "base-sharded", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shutil.move(folder / "model-00002-of-00002.safetensors", tmp_path / "outside.safetensors")
    name = next(n for n, f in index["weight_map"].items() if f.startswith("model-00002"))
    index["weight_map"][name] = "../outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=rf"shard '\.\./outside\.safetensors' of tensor '{name}' is not a file name inside"
    ):
        open_checkpoint(folder)


def test_index_naming_a_tensor_its_shard_lacks(samples, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(samples / "base-sharded", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'ghost.weight' is listed in the index but missing"):
        open_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        open_checkpoint(folder)


def test_fp8_tensors_are_read_and_flagged_floating(tmp_path):
    save_file({"w": torch.randn(8, 4).to(torch.float8_e4m3fn)}, tmp_path / "fp8.safetensors")
    with open_checkpoint(tmp_path / "fp8.safetensors") as ckpt:
        assert ckpt.info("w").dtype == "float8_e4m3fn" and ckpt.info("w").is_floating
        assert ckpt["w"].float().shape == (8, 4)


def test_storages_of_tensors_rebuilt_other_ways_are_crc_checked_too(tmp_path):
    """A tensor with a Python attribute is saved through _rebuild_from_type_v2, and an OrderedDict
    built from pairs hides its items from a plain walk: their storages are checked at open."""
    from collections import OrderedDict

    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    weight.note = "carries an attribute"
    path = tmp_path / "rebuilt.pt"
    torch.save(OrderedDict([("layer.weight", weight)]), path)
    with open_checkpoint(path) as ckpt:  # intact: read as torch reads it
        assert torch.equal(ckpt["layer.weight"], weight)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith("/data/0")))
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    start += int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    raw[start + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"rebuilt\.pt: zip record '.*/data/0' is corrupt: CRC-32"):
        open_checkpoint(path)
