"""A corpus of broken, hostile and mismatched checkpoints, generated on demand (nothing binary is committed).

Each :class:`Case` writes its files into an empty folder and returns the checkpoint argument of the
command line (and, for some, a ``--base``). Every command must refuse each case with exit 2 and one
``Error:`` line naming what is at fault (:attr:`Case.mentions`), run no pickled code, and write nothing.

Run ``python tests/corpus.py OUTDIR`` to write every case into ``OUTDIR/<case name>/`` for manual probing;
it prints one line per case: name, checkpoint, base, and what the error should say.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

MARKER = "pwned"  # the folder a malicious payload would create inside its case folder
A, B = "enc.proj.weight", "enc.out.weight"  # the tensors of every small checkpoint here
EXTRA = "enc.extra.weight"  # listed in an index, stored nowhere
BuildResult = Path | tuple[Path, Path | None]


@dataclass(frozen=True)
class Case:
    """One corrupt input.

    Attributes:
        name: ``group-what``, used as the test id.
        build: Writes the case into an empty folder; returns the checkpoint path, or ``(path, base or None)``.
        expect: What the single error line should say, in words.
        mentions: Substrings the error line must contain (file names, tensor names, refused globals).
    """

    name: str
    build: Callable[[Path], BuildResult]
    expect: str
    mentions: tuple[str, ...]

    def make(self, folder: Path) -> tuple[Path, Path | None]:
        """Build into ``folder`` and return ``(checkpoint, base or None)``."""
        folder.mkdir(parents=True, exist_ok=True)
        got = self.build(folder)
        return got if isinstance(got, tuple) else (got, None)


# ----------------------------------------------------------------------------------------------- helpers


def tensors(rows: int = 4, cols: int = 4) -> dict[str, torch.Tensor]:
    """Two small float32 matrices, entries near 1 (so a flipped low mantissa byte leaves them finite)."""
    gen = torch.Generator().manual_seed(0)
    return {
        A: torch.randn(rows, cols, generator=gen) + 1.0,
        B: torch.randn(cols, rows, generator=gen) + 1.0,
    }


def _cut(path: Path, keep: int | float) -> None:
    """Keep the first ``keep`` bytes (an int) or share of bytes (a float) of ``path``."""
    data = path.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    assert 0 < n < len(data), "a cut must keep some bytes and drop some"
    path.write_bytes(data[:n])


def _st_header(entries: dict[str, dict] | str) -> bytes:
    """A safetensors header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes."""
    text = entries if isinstance(entries, str) else json.dumps(entries, separators=(",", ":"))
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _entry(shape: list, start: int, end: int, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _raw_st(path: Path, entries: dict[str, dict] | str, data: bytes) -> Path:
    path.write_bytes(_st_header(entries) + data)
    return path


def _data(nbytes: int) -> bytes:
    """``nbytes`` of finite float32 data."""
    return np.linspace(1.0, 2.0, nbytes // 4, dtype="<f4").tobytes() + b"\0" * (nbytes % 4)


def _local_data_offset(path: Path, member: str) -> int:
    """Where ``member``'s bytes start in the zip ``path`` (after its local header and extra field)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with path.open("rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    assert local[:4] == b"PK\x03\x04", "not a local file header"
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def _member(path: Path, suffix: str) -> str:
    """The one member of zip ``path`` whose name ends in ``suffix`` (torch prefixes a folder)."""
    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(suffix)]
    return name


def _rezip(path: Path, replace: dict[str, bytes]) -> None:
    """Rewrite zip ``path`` stored (as torch writes it), member data 64-byte aligned, with some members replaced."""
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, replace.get(info.filename, zf.read(info))) for info in zf.infolist()]
    assert set(replace) <= {name for name, _ in members}, "replacing a member that is not there"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            start = buf.tell() + 30 + len(name.encode()) + 4  # a padding extra field holds 4 bytes at least
            pad = -start % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB", torch's own padding field id
            zf.writestr(info, data)
    path.write_bytes(buf.getvalue())


class Execs:
    """A pickle payload calling ``builtins.exec`` on ``code`` when unpickled without ``weights_only``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def _runs_code(folder: Path):
    from tests.conftest import RunsCode  # lazily: the script adds the repository root to sys.path first

    return RunsCode(str(folder / MARKER))


# ---------------------------------------------------------------------------------------- empty / no file


def _empty(filename: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / filename
        path.write_bytes(b"")
        return path

    return build


def no_checkpoint_folder(folder: Path) -> Path:
    model = folder / "model-dir"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "README.md").write_text("weights not downloaded\n")
    return model


def unknown_suffix(folder: Path) -> Path:
    path = folder / "weights.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 120)
    return path


def dangling_symlink(folder: Path) -> Path:
    path = folder / "linked.safetensors"
    path.symlink_to("gone.safetensors")
    return path


# ------------------------------------------------------------------------------------------- safetensors


def st_short(folder: Path) -> Path:
    path = folder / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")  # fewer than the 8 bytes of the header length
    return path


def st_not_json(folder: Path) -> Path:
    body = b"{not json at all"
    return _raw_st(folder / "garbled.safetensors", body.decode(), b"")


def st_not_object(folder: Path) -> Path:
    return _raw_st(folder / "listhead.safetensors", "[1, 2, 3]", b"")


def st_header_past_eof(folder: Path) -> Path:
    path = folder / "longhead.safetensors"
    save_file(tensors(), path)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])
    return path


def st_header_huge(folder: Path) -> Path:
    path = folder / "hugehead.safetensors"
    save_file(tensors(), path)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    return path


def st_offsets_out_of_range(folder: Path) -> Path:
    entries = {A: _entry([4, 4], 0, 64), B: _entry([4, 4], 64, 4096)}
    return _raw_st(folder / "offsets.safetensors", entries, _data(128))


def st_overlap(folder: Path) -> Path:
    # Both sizes match their shapes and every byte is covered; only the ranges overlap.
    entries = {A: _entry([4, 4], 0, 64), B: _entry([4, 4], 32, 96)}
    return _raw_st(folder / "overlap.safetensors", entries, _data(96))


def st_gap(folder: Path) -> Path:
    entries = {A: _entry([4, 4], 0, 64), B: _entry([4, 4], 72, 136)}
    return _raw_st(folder / "gap.safetensors", entries, _data(136))


def st_size_mismatch(folder: Path) -> Path:
    entries = {A: _entry([4, 4], 0, 60), B: _entry([4, 4], 60, 124)}  # A needs 64 bytes
    return _raw_st(folder / "badsize.safetensors", entries, _data(124))


def st_unknown_dtype(folder: Path) -> Path:
    entries = {A: _entry([4, 4], 0, 64, dtype="F99"), B: _entry([4, 4], 64, 128)}
    return _raw_st(folder / "dtype.safetensors", entries, _data(128))


def st_duplicate_name(folder: Path) -> Path:
    one, two = json.dumps(_entry([4, 4], 0, 64)), json.dumps(_entry([4, 4], 64, 128))
    text = f'{{"{A}": {one}, "{A}": {two}}}'  # the same key twice: json.loads keeps the last silently
    return _raw_st(folder / "dupname.safetensors", text, _data(128))


def st_negative_shape(folder: Path) -> Path:
    entries = {A: _entry([-4, -4], 0, 64), B: _entry([4, 4], 64, 128)}  # (-4)(-4) = 16: the size "matches"
    return _raw_st(folder / "negshape.safetensors", entries, _data(128))


def st_fractional_shape(folder: Path) -> Path:
    entries = {A: _entry([4.5, 4], 0, 64), B: _entry([4, 4], 64, 128)}
    return _raw_st(folder / "fracshape.safetensors", entries, _data(128))


def st_truncated_data(folder: Path) -> Path:
    path = folder / "cutdata.safetensors"
    save_file(tensors(), path)
    _cut(path, len(path.read_bytes()) - 10)  # the header is whole; the last tensor lacks 10 bytes
    return path


# ----------------------------------------------------------------------------------------- base mismatch


def base_shape_mismatch(folder: Path) -> tuple[Path, Path]:
    ft, base = tensors(8, 6), tensors(8, 6)
    base[A] = base[A].T.contiguous()  # [6, 8] against the fine-tune's [8, 6]
    save_file(ft, folder / "finetune.safetensors")
    save_file(base, folder / "base.safetensors")
    return folder / "finetune.safetensors", folder / "base.safetensors"


def base_empty(folder: Path) -> tuple[Path, Path]:
    save_file(tensors(), folder / "finetune.safetensors")
    (folder / "base.safetensors").write_bytes(b"")
    return folder / "finetune.safetensors", folder / "base.safetensors"


# ------------------------------------------------------------------------------------------------ shards

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def _sharded(folder: Path, weight_map: dict | list | None = None, index_text: str | None = None) -> Path:
    """``folder/sharded``: A in shard 1, B in shard 2, and an index (the usual one unless given)."""
    model = folder / "sharded"
    model.mkdir()
    t = tensors()
    save_file({A: t[A]}, model / SHARD1)
    save_file({B: t[B]}, model / SHARD2)
    if index_text is None:
        weight_map = {A: SHARD1, B: SHARD2} if weight_map is None else weight_map
        index_text = json.dumps({"metadata": {"total_size": 128}, "weight_map": weight_map}, indent=2)
    (model / INDEX).write_text(index_text)
    return model


def index_not_json(folder: Path) -> Path:
    return _sharded(folder, index_text='{"weight_map": {"enc.proj.weight": ')


def index_no_weight_map(folder: Path) -> Path:
    return _sharded(folder, index_text=json.dumps({"metadata": {"total_size": 128}}))


def index_weight_map_not_object(folder: Path) -> Path:
    return _sharded(folder, weight_map=[SHARD1, SHARD2])


def index_absolute(folder: Path) -> Path:
    outside = folder / "outside.safetensors"
    save_file({B: tensors()[B]}, outside)
    return _sharded(folder, weight_map={A: SHARD1, B: str(outside.resolve())})


def index_dotdot(folder: Path) -> Path:
    save_file({B: tensors()[B]}, folder / "outside.safetensors")
    return _sharded(folder, weight_map={A: SHARD1, B: "../outside.safetensors"})


def index_missing_shard(folder: Path) -> Path:
    model = _sharded(folder)
    (model / SHARD2).unlink()
    return model


def index_tensor_missing_from_shard(folder: Path) -> Path:
    return _sharded(folder, weight_map={A: SHARD1, B: SHARD2, EXTRA: SHARD1})


def tensor_in_two_shards(folder: Path) -> Path:
    model = _sharded(folder)
    save_file(tensors(), model / SHARD2)  # shard 2 holds A too; the index maps A to shard 1
    return model


def shard_truncated(folder: Path) -> Path:
    model = _sharded(folder)
    _cut(model / SHARD2, len((model / SHARD2).read_bytes()) - 10)  # header whole, data 10 bytes short
    return model


# --------------------------------------------------------------------------------------------------- npz


def npz_huge_header(folder: Path) -> Path:
    path = folder / "bomb.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("layer1_weight.npy", _npy(np.ones((4, 4), np.float32)))
        zf.writestr("layer0_weight.npy", header.getvalue() + _data(64))  # declares 4 TiB, holds 64 bytes
    return path


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npz_object(folder: Path) -> Path:
    path = folder / "objects.npz"
    np.savez(path, layer0_weight=np.ones((4, 4), np.float32), pickled_meta=np.array([{"k": 1}], dtype=object))
    return path


def npz_truncated(folder: Path) -> Path:
    path = folder / "cut.npz"
    np.savez_compressed(path, layer0_weight=np.ones((16, 16), np.float32), layer1_weight=np.ones((8, 8), np.float32))
    _cut(path, 0.5)
    return path


def npz_crc(folder: Path) -> Path:
    path = folder / "crcflip.npz"
    np.savez(path, layer0_weight=np.linspace(1, 2, 16, dtype=np.float32).reshape(4, 4))  # stored, not deflated
    start = _local_data_offset(path, "layer0_weight.npy")
    with path.open("rb") as f:
        f.seek(start)
        assert np.lib.format.read_magic(f) == (1, 0)
        np.lib.format.read_array_header_1_0(f)  # skip the .npy header
        array_start = f.tell()
    _flip(path, array_start)  # lowest mantissa byte of the first float: still finite, only the CRC tells
    return path


# ----------------------------------------------------------------------------------------------- torch


def _torch_zip(path: Path, obj: object = None) -> Path:
    torch.save(tensors() if obj is None else obj, path)
    return path


def pt_crc(folder: Path) -> Path:
    path = _torch_zip(folder / "flipped.pt")
    _flip(path, _local_data_offset(path, _member(path, "/data/0")))  # in place: the directory stays intact
    return path


def pt_crc_other_rebuilds(folder: Path) -> Path:
    """Tensors torch rebuilds another way than a plain state dict's: one with a Python attribute
    (``_rebuild_from_type_v2``) inside an OrderedDict built from a list of pairs."""
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    weight.note = "carries an attribute"
    path = _torch_zip(folder / "rebuilt.pt", OrderedDict([("layer.weight", weight)]))
    _flip(path, _local_data_offset(path, _member(path, "/data/0")))
    return path


def pt_short_record(folder: Path) -> Path:
    path = _torch_zip(folder / "shortrec.pt")
    name = _member(path, "/data/0")
    with zipfile.ZipFile(path) as zf:
        record = zf.read(name)
    _rezip(path, {name: record[: len(record) // 2]})  # a consistent zip whose record is too short
    return path


def pt_truncated(folder: Path) -> Path:
    path = _torch_zip(folder / "cut.pt")
    _cut(path, 0.6)
    return path


def pt_bad_pickle(folder: Path) -> Path:
    path = _torch_zip(folder / "badpkl.pt")
    _rezip(path, {_member(path, "/data.pkl"): b"\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01\xff\xfe garbage"})
    return path


def pt_not_mapping(folder: Path) -> Path:
    return _torch_zip(folder / "listof.pt", list(tensors().values()))


def legacy_truncated(folder: Path) -> Path:
    path = folder / "legacy.pt"
    torch.save(tensors(), path, _use_new_zipfile_serialization=False)
    _cut(path, 0.6)
    return path


# ------------------------------------------------------------------------------------------- malicious


def evil_zip_pt(folder: Path) -> Path:
    path = _torch_zip(folder / "evil.pt")  # a valid torch.save zip (prefix "evil/"), its pickle swapped
    _rezip(path, {_member(path, "/data.pkl"): pickle.dumps(_runs_code(folder), protocol=2)})
    return path


def evil_legacy_pt(folder: Path) -> Path:
    path = folder / "evil-legacy.pt"
    torch.save(_runs_code(folder), path, _use_new_zipfile_serialization=False)  # pickled, never run
    return path


def evil_raw_bin(folder: Path) -> Path:
    path = folder / "pytorch_evil.bin"
    path.write_bytes(pickle.dumps(_runs_code(folder)))
    return path


def evil_pth(folder: Path) -> Path:
    return _torch_zip(folder / "evil.pth", {**tensors(), "hook": _runs_code(folder)})


def _execs(folder: Path) -> Execs:
    return Execs(f"import os; os.makedirs({str(folder / MARKER)!r})")


def evil_exec(folder: Path) -> Path:
    # torch.save pickles with protocol 2, which spells the global "__builtin__ exec" (Python 3 reads builtins.exec).
    return _torch_zip(folder / "execs.pt", {**tensors(), "hook": _execs(folder)})


def evil_exec_protocol4(folder: Path) -> Path:
    path = folder / "execs4.bin"  # protocol 4 (pickle's default): "builtins" "exec" by STACK_GLOBAL, in frames
    path.write_bytes(pickle.dumps({**tensors(), "hook": _execs(folder)}, protocol=4))
    return path


# ------------------------------------------------------------------------------------------------- cases

EXEC_REFUSED = "names builtins.exec as refused and suggests converting to safetensors"
CASES: list[Case] = [
    Case("empty-safetensors", _empty("empty.safetensors"), "an empty file", ("empty.safetensors",)),
    Case("empty-pt", _empty("empty.pt"), "an empty file", ("empty.pt",)),
    Case("empty-bin", _empty("empty.bin"), "an empty file", ("empty.bin",)),
    Case("empty-npz", _empty("empty.npz"), "an empty file", ("empty.npz",)),
    Case("folder-no-checkpoint", no_checkpoint_folder, "no checkpoint in the folder", ("model-dir",)),
    Case("unknown-suffix", unknown_suffix, "unknown format .h5", ("weights.h5",)),
    Case("dangling-symlink", dangling_symlink, "no such file", ("linked.safetensors",)),
    Case("safetensors-short", st_short, "too short for a header length", ("short.safetensors",)),
    Case("safetensors-not-json", st_not_json, "header is not JSON", ("garbled.safetensors",)),
    Case("safetensors-not-object", st_not_object, "header is not a JSON object", ("listhead.safetensors",)),
    Case("safetensors-header-past-eof", st_header_past_eof, "header length past the end", ("longhead.safetensors",)),
    Case("safetensors-header-huge", st_header_huge, "header length 2**40", ("hugehead.safetensors",)),
    Case("safetensors-offsets-out-of-range", st_offsets_out_of_range, "B past the data", ("offsets.safetensors", B)),
    Case("safetensors-overlap", st_overlap, "A and B overlap", ("overlap.safetensors", A, B)),
    Case("safetensors-gap", st_gap, "8 bytes belong to no tensor", ("gap.safetensors",)),
    Case("safetensors-size-mismatch", st_size_mismatch, "A: 60 bytes for 64", ("badsize.safetensors", A)),
    Case("safetensors-unknown-dtype", st_unknown_dtype, "A: dtype F99", ("dtype.safetensors", A, "F99")),
    Case("safetensors-duplicate-name", st_duplicate_name, "A twice in the header", ("dupname.safetensors", A)),
    Case("safetensors-negative-shape", st_negative_shape, "A: shape [-4, -4]", ("negshape.safetensors", A)),
    Case("safetensors-fractional-shape", st_fractional_shape, "A: shape [4.5, 4]", ("fracshape.safetensors", A)),
    Case("safetensors-truncated-data", st_truncated_data, "data section 10 bytes short", ("cutdata.safetensors",)),
    Case("base-shape-mismatch", base_shape_mismatch, "A: [8, 6] vs base [6, 8]", (A, "base.safetensors")),
    Case("base-empty", base_empty, "the base is an empty file", ("base.safetensors",)),
    Case("sharded-index-not-json", index_not_json, "index is not JSON", (INDEX,)),
    Case("sharded-index-no-weight-map", index_no_weight_map, "index lacks weight_map", (INDEX, "weight_map")),
    Case("sharded-weight-map-not-object", index_weight_map_not_object, "weight_map is a list", (INDEX, "weight_map")),
    Case("sharded-absolute-path", index_absolute, "B's shard is an absolute path", (INDEX, B)),
    Case("sharded-dotdot", index_dotdot, "B's shard lies outside the folder", (INDEX, B)),
    Case("sharded-missing-shard", index_missing_shard, "shard 2 does not exist", (SHARD2,)),
    Case("sharded-tensor-missing", index_tensor_missing_from_shard, "not in its shard", (EXTRA, SHARD1)),
    Case("sharded-tensor-in-two-shards", tensor_in_two_shards, "A in both shards", (A, SHARD1, SHARD2)),
    Case("sharded-shard-truncated", shard_truncated, "shard 2 is truncated", (SHARD2,)),
    Case("npz-huge-header", npz_huge_header, "layer0_weight declares 4 TiB in 64 bytes", ("bomb.npz", "layer0_weight")),
    Case("npz-object-dtype", npz_object, "pickled_meta is an object array", ("objects.npz", "pickled_meta")),
    Case("npz-truncated", npz_truncated, "a truncated zip", ("cut.npz",)),
    Case("npz-crc-mismatch", npz_crc, "layer0_weight fails its CRC", ("crcflip.npz", "layer0_weight")),
    Case("pt-crc-mismatch", pt_crc, "record data/0 fails its CRC", ("flipped.pt", "data/0")),
    Case("pt-crc-mismatch-rebuilt", pt_crc_other_rebuilds, "record data/0 fails its CRC", ("rebuilt.pt", "data/0")),
    Case("pt-short-record", pt_short_record, "record data/0 shorter than its tensor", ("shortrec.pt",)),
    Case("pt-truncated", pt_truncated, "a truncated zip", ("cut.pt",)),
    Case("pt-malformed-pickle", pt_bad_pickle, "data.pkl does not unpickle", ("badpkl.pt",)),
    Case("pt-not-mapping", pt_not_mapping, "a list, not a state dict", ("listof.pt",)),
    Case("legacy-truncated", legacy_truncated, "a truncated legacy file", ("legacy.pt",)),
    Case("evil-zip-pt", evil_zip_pt, "os.makedirs refused", ("evil.pt",)),
    Case("evil-legacy-pt", evil_legacy_pt, "os.makedirs refused", ("evil-legacy.pt",)),
    Case("evil-raw-bin", evil_raw_bin, "os.makedirs refused", ("pytorch_evil.bin",)),
    Case("evil-pth", evil_pth, "os.makedirs refused", ("evil.pth",)),
    Case("evil-exec", evil_exec, EXEC_REFUSED, ("execs.pt", "builtins.exec", "safetensors")),
    Case("evil-exec-protocol4", evil_exec_protocol4, EXEC_REFUSED, ("execs4.bin", "builtins.exec", "safetensors")),
]  # fmt: skip
assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


def write_corpus(out: Path) -> list[tuple[Case, Path, Path | None]]:
    """Write every case into ``out/<case name>/``."""
    return [(case, *case.make(out / case.name)) for case in CASES]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/corpus.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if out.exists() and any(out.iterdir()):
        print(f"{out}: exists and is not empty", file=sys.stderr)
        return 2
    for case, ckpt, base in write_corpus(out):
        print(f"{case.name}\t{ckpt}\t{base or '-'}\t{case.expect}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))  # for tests.conftest
    raise SystemExit(main(sys.argv[1:]))
