"""Fuzz the checkpoint readers with mutated sample files: they fail only with the package's errors.

Each format gets a small valid sample (a few tensors, about 1 KB of data): ``.safetensors``, a
zip-format torch ``.pt``, a legacy (non-zip) torch ``.bin``, ``.npz`` stored and compressed, and a
sharded safetensors folder (index JSON and two shards). Hypothesis composes one to four mutations
of it: byte flips and overwrites (half of them inside the header region: the safetensors JSON
header, zip local headers, central directory and ``data.pkl``, the ``.npy`` headers, the pickles
of the legacy format), truncation, extension, overwritten length/offset/size/CRC fields, rewritten
safetensors header entries and ``.npy`` headers, zip members edited with their CRC fixed, and
shard indexes pointing outside the folder, at duplicates or at non-strings. Offsets in a
mutation refer to the unmutated sample.

Every mutated checkpoint is opened and every tensor read. The test passes when that succeeds or
raises a :class:`~lowrank_audit.errors.LowrankAuditError`; any other exception (``MemoryError``,
a Rust panic, ``TypeError``...) fails it, as does a ``LowrankAuditError`` caused by a failed
allocation. Reads must not allocate more than the file could hold: each tensor's bytes at most
the size of the file it came from (1100 times that for a compressed ``.npz``: deflate expands at
most about 1032:1), and the Python/NumPy allocations traced by :mod:`tracemalloc` during the
whole open-and-read stay under ``_PEAK_SLACK`` plus twice that bound.

The normal suite runs a few hundred examples in all. To fuzz for longer, set the number of
examples per format::

    LOWRANK_AUDIT_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_readers.py

A crash of the interpreter itself (a segfault in a native reader) ends the pytest run instead of
failing one test; pytest's faulthandler prints where.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickletools
import struct
import tempfile
import tracemalloc
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lowrank_audit.errors import LowrankAuditError
from lowrank_audit.io.checkpoint import open_checkpoint

FORMATS = ["safetensors", "torch_zip", "torch_legacy", "npz", "npz_compressed", "sharded"]
# Examples per format: six formats, so 300 in the normal suite. The variable asks for more.
DEFAULT_EXAMPLES = 50
EXAMPLES_ENV = "LOWRANK_AUDIT_FUZZ_EXAMPLES"
# Deflate expands at most about 1032:1, so this bounds what a compressed member can decode to.
DEFLATE_RATIO = 1100
# Fixed headroom for the traced peak: interpreter and library bookkeeping during a read (JSON and
# pickle parsing, zipfile buffers, numpy's 256 KiB read chunks) stays far below it, while one
# buffer sized from a corrupt header (the bug this looks for) is typically far above it.
_PEAK_SLACK = 64 * 2**20

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
LOCAL_FIELDS = {"flags": (6, 2), "method": (8, 2), "crc": (14, 4), "csize": (18, 4), "usize": (22, 4)}
LOCAL_FIELDS |= {"name_len": (26, 2), "extra_len": (28, 2)}
CENTRAL_FIELDS = {"flags": (8, 2), "method": (10, 2), "crc": (16, 4), "csize": (20, 4), "usize": (24, 4)}
CENTRAL_FIELDS |= {"name_len": (28, 2), "extra_len": (30, 2), "comment_len": (32, 2), "local_offset": (42, 4)}
EOCD_FIELDS = {"disk_entries": (8, 2), "entries": (10, 2), "cd_size": (12, 4), "cd_offset": (16, 4)}
EOCD_FIELDS |= {"comment_len": (20, 2)}
EOCD64_FIELDS = {"entries": (32, 8), "cd_size": (40, 8), "cd_offset": (48, 8)}
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "C64", "F4", "", "f32", "U64", "I4"]
NPY_DESCRS = ["<f4", "<f2", "<f8", ">f4", "|u1", "|b1", "<i8", "<u2", "<c8", "<U4", "|S3", "|V8", "O", "<M8[s]"]
NPY_DESCRS += ["<f16", "[('a', '<f4')]"]


def _tensors(bf16: bool) -> dict[str, torch.Tensor]:
    """Distinct element counts, so a legacy storage's size header says which tensor follows it."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(16, 8, generator=gen),
        "model.layers.0.q_proj.weight": torch.randn(12, 8, generator=gen).half(),
        "model.layers.0.up_proj.weight": torch.randn(10, 12, generator=gen).to(
            torch.bfloat16 if bf16 else torch.float32
        ),
        "model.conv.weight": torch.randn(4, 3, 5, generator=gen),
        "model.norm.weight": torch.randn(24, generator=gen).half(),
    }


@dataclass(frozen=True)
class Sample:
    """A valid checkpoint in memory and where its structure lies (offsets into the bytes)."""

    fmt: str
    entry: str  # what open_checkpoint is given, relative to the folder holding the files
    files: dict[str, bytes]
    hot: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # header regions [start, stop)
    fields: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)  # (label, offset, width)
    # Stored zip members: name -> (local header, central entry, data offset, size, hot prefix)
    members: dict[str, dict[str, tuple[int, int, int, int, int]]] = field(default_factory=dict)


def _zip_structure(data: bytes) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]], dict]:
    """Header regions, length/offset fields and members of a valid zip, found from its end record."""
    eocd = data.rfind(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    fields = [(f"eocd.{k}", eocd + off, w) for k, (off, w) in EOCD_FIELDS.items()]
    hot = [(eocd, len(data))]
    locator = data.rfind(b"PK\x06\x07", 0, eocd)
    if locator >= 0:  # zip64 end records (torch always writes them)
        (eocd64,) = struct.unpack_from("<Q", data, locator + 8)
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", data, eocd64 + 32)
        fields.append(("zip64_locator.eocd64_offset", locator + 8, 8))
        fields += [(f"eocd64.{k}", eocd64 + off, w) for k, (off, w) in EOCD64_FIELDS.items()]
        hot.append((eocd64, eocd))
    hot.append((cd_offset, cd_offset + cd_size))
    members = {}
    pos = cd_offset
    for i in range(count):
        assert data[pos : pos + 4] == b"PK\x01\x02"
        method, csize, nlen, elen, clen = struct.unpack_from("<H8xI4xHHH", data, pos + 10)
        (local,) = struct.unpack_from("<I", data, pos + 42)
        name = data[pos + 46 : pos + 46 + nlen].decode()
        lnlen, lelen = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + lnlen + lelen
        hot.append((local, start))
        fields += [(f"central[{i}]({name}).{k}", pos + off, w) for k, (off, w) in CENTRAL_FIELDS.items()]
        fields += [(f"local[{i}]({name}).{k}", local + off, w) for k, (off, w) in LOCAL_FIELDS.items()]
        if method == zipfile.ZIP_STORED:
            members[name] = (local, pos, start, csize, 0)
        elif name.endswith(".npy"):  # a deflate stream's first bytes decode to the .npy header
            hot.append((start, start + min(csize, 64)))
        pos += 46 + nlen + elen + clen
    return hot, fields, members


def _build(fmt: str, folder: Path) -> Sample:
    tensors = _tensors(bf16=not fmt.startswith("npz"))
    if fmt == "safetensors":
        save_file(tensors, folder / "model.safetensors")
        data = (folder / "model.safetensors").read_bytes()
        (n,) = struct.unpack_from("<Q", data)
        return Sample(fmt, "model.safetensors", {"model.safetensors": data}, {"model.safetensors": [(0, 8 + n)]})
    if fmt == "sharded":
        names = sorted(tensors)
        parts = {SHARDS[0]: names[:3], SHARDS[1]: names[3:]}
        files, hot = {}, {}
        for shard, part in parts.items():
            save_file({k: tensors[k] for k in part}, folder / shard)
            files[shard] = (folder / shard).read_bytes()
            hot[shard] = [(0, 8 + struct.unpack_from("<Q", files[shard])[0])]
        index = {"metadata": {}, "weight_map": {k: shard for shard, part in parts.items() for k in part}}
        files[INDEX] = json.dumps(index, indent=2).encode()
        hot[INDEX] = [(0, len(files[INDEX]))]
        return Sample(fmt, "", files, hot)
    if fmt == "torch_legacy":
        torch.save(tensors, folder / "model.bin", _use_new_zipfile_serialization=False)
        data = (folder / "model.bin").read_bytes()
        stream = io.BytesIO(data)
        for _ in range(5):  # magic number, protocol, system info, the state dict, the storage keys
            for _op in pickletools.genops(stream):
                pass
        pickles_end = stream.tell()
        element_size = {t.numel(): t.element_size() for t in tensors.values()}
        fields, pos = [], pickles_end
        for i in range(len(tensors)):  # each storage: its element count (int64), then its bytes
            (numel,) = struct.unpack_from("<q", data, pos)
            fields.append((f"storage[{i}].numel", pos, 8))
            pos += 8 + numel * element_size[numel]
        assert pos == len(data)
        return Sample(fmt, "model.bin", {"model.bin": data}, {"model.bin": [(0, pickles_end)]}, {"model.bin": fields})
    if fmt == "torch_zip":
        name = "model.pt"
        torch.save(tensors, folder / name)
    else:
        name = "model.npz"
        save = np.savez_compressed if fmt == "npz_compressed" else np.savez
        save(folder / name, **{k: t.numpy() for k, t in tensors.items()})
    data = (folder / name).read_bytes()
    hot, fields, members = _zip_structure(data)
    for member, (local, central, start, size, _) in list(members.items()):
        if member.endswith("data.pkl"):
            hot.append((start, start + size))
            members[member] = (local, central, start, size, size)
        elif member.endswith(".npy"):
            (header_len,) = struct.unpack_from("<H", data, start + 8)
            hot.append((start, start + 10 + header_len))
            members[member] = (local, central, start, size, 10 + header_len)
    return Sample(fmt, name, {name: data}, {name: hot}, {name: fields}, {name: members})


@functools.cache
def sample(fmt: str) -> Sample:
    with tempfile.TemporaryDirectory() as tmp:
        return _build(fmt, Path(tmp))


# --- mutations: plain tuples (kind, file, ...), so hypothesis prints them readably -------------


def _int_values(width: int, length: int) -> st.SearchStrategy[int]:
    top = 2 ** (8 * width)
    special = {0, 1, 7, 8, 64, length - 1, length, length + 1, 2**16, 2**31, 2**32 - 1, 2**32, 2**40}
    special |= {2**62, 2**63 - 1, 2**63, 2**64 - 1, 100_000_001}
    return st.one_of(st.sampled_from(sorted(v for v in special if 0 <= v < top)), st.integers(0, top - 1))


def _offset(size: int, hot: list[tuple[int, int]]) -> st.SearchStrategy[int]:
    """Anywhere in the file half the time, inside a header region the other half."""
    anywhere = st.integers(0, size - 1)
    if not hot:
        return anywhere
    return st.one_of(anywhere, st.sampled_from(hot).flatmap(lambda r: st.integers(r[0], max(r[0], r[1] - 1))))


def _byte_ops(name: str, data: bytes, hot: list[tuple[int, int]]) -> list[st.SearchStrategy]:
    offset = _offset(len(data), hot)
    return [
        st.tuples(st.just("xor"), st.just(name), offset, st.integers(1, 255)),
        st.tuples(st.just("overwrite"), st.just(name), offset, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("truncate"), st.just(name), st.integers(0, len(data) - 1)),
        st.tuples(st.just("extend"), st.just(name), st.binary(min_size=1, max_size=64)),
    ]


def _field_ops(name: str, data: bytes, fields: list[tuple[str, int, int]]) -> list[st.SearchStrategy]:
    if not fields:
        return []

    def overwrite(f: tuple[str, int, int]) -> st.SearchStrategy[tuple]:
        label, offset, width = f
        return _int_values(width, len(data)).map(lambda value: ("set", name, label, offset, width, value))

    return [st.sampled_from(fields).flatmap(overwrite)]


def _safetensors_ops(name: str, data: bytes) -> list[st.SearchStrategy]:
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    tensors = sorted(k for k in header if k != "__metadata__")
    size = len(data) - 8 - n
    big = st.one_of(_int_values(8, size), st.sampled_from([-1, 2**64, 2**128, 1.5]))
    which = st.sampled_from(tensors)
    return [
        st.tuples(st.just("set"), st.just(name), st.just("header_len"), st.just(0), st.just(8), _int_values(8, n)),
        st.tuples(st.just("st_offset"), st.just(name), which, st.integers(0, 1), big),
        st.tuples(st.just("st_shape"), st.just(name), which, st.integers(0, 3), big),
        st.tuples(st.just("st_dtype"), st.just(name), which, st.sampled_from(ST_DTYPES)),
    ]


def _member_ops(name: str, members: dict[str, tuple[int, int, int, int, int]]) -> list[st.SearchStrategy]:
    """Edit a stored member's bytes and fix its CRC in both headers, so zipfile's check passes."""
    if not members:
        return []

    def edit(member: str) -> st.SearchStrategy:
        _, _, _, size, hot = members[member]
        offset = st.integers(0, size - 1) if not hot else st.one_of(st.integers(0, size - 1), st.integers(0, hot - 1))
        return st.tuples(st.just("member_xor"), st.just(name), st.just(member), offset, st.integers(1, 255))

    return [st.sampled_from(sorted(members)).flatmap(edit)]


def _npy_header_ops(name: str, data: bytes) -> list[st.SearchStrategy]:
    members = zipfile.ZipFile(io.BytesIO(data)).namelist()
    dim = st.one_of(st.integers(0, 64), st.sampled_from([-1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**64]))
    return [
        st.tuples(
            st.just("npy_header"),
            st.just(name),
            st.sampled_from(members),
            st.lists(dim, max_size=4).map(tuple),
            st.sampled_from(NPY_DESCRS),
            st.booleans(),
        )
    ]


def _index_ops(data: bytes) -> list[st.SearchStrategy]:
    names = sorted(json.loads(data)["weight_map"])
    shard_values = st.one_of(
        st.sampled_from(["../x", "../" + SHARDS[0], "/etc/hostname", "/", "", ".", "..", INDEX, "missing.safetensors"]),
        st.sampled_from(["sub/../" + SHARDS[1], "a\x00b.safetensors", "x" * 300 + ".safetensors", "<abs>"]),
        st.sampled_from(SHARDS),  # the other shard, or the same one listed twice
        st.sampled_from([0, 1.5, None, True, [], {}, [SHARDS[0]], {"a": SHARDS[0]}]),
    )
    non_objects = st.sampled_from([[], [[names[0], SHARDS[0]]], "weights", 1, None, True])
    return [
        st.tuples(st.just("index_set"), st.just(INDEX), st.sampled_from(names + ["extra.weight"]), shard_values),
        st.tuples(st.just("index_dup"), st.just(INDEX), st.sampled_from(names), shard_values),
        st.tuples(st.just("index_weight_map"), st.just(INDEX), non_objects),
        st.tuples(st.just("index_top"), st.just(INDEX), non_objects),
        st.tuples(st.just("index_drop"), st.just(INDEX), st.sampled_from(["weight_map", "metadata"])),
    ]


@functools.cache
def mutations(fmt: str) -> st.SearchStrategy[list[tuple]]:
    s = sample(fmt)
    ops: list[st.SearchStrategy] = []
    for name, data in s.files.items():
        ops += _byte_ops(name, data, s.hot.get(name, []))
        ops += _field_ops(name, data, s.fields.get(name, []))
        ops += _member_ops(name, s.members.get(name, {}))
        if name.endswith(".safetensors"):
            ops += _safetensors_ops(name, data)
        elif name.endswith(".npz"):
            ops += _npy_header_ops(name, data)
        elif name == INDEX:
            ops += _index_ops(data)
    return st.lists(st.one_of(ops), min_size=1, max_size=4)


def _rewrite_safetensors(data: bytes, op: tuple) -> bytes:
    kind, _, tensor, *args = op
    try:
        (n,) = struct.unpack_from("<Q", data)
        header = json.loads(data[8 : 8 + n])
        entry = header[tensor]
        if kind == "st_offset":
            which, value = args
            entry["data_offsets"][which] = value
        elif kind == "st_shape":
            dim, value = args
            entry["shape"][min(dim, len(entry["shape"])) : dim + 1] = [value]  # past the last: a new dim
        else:
            entry["dtype"] = args[0]
    except Exception:  # an earlier mutation broke the header: nothing to rewrite
        return data
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def _npy_header(shape: tuple, descr: str, fortran: bool) -> bytes:
    descr_repr = descr if descr.startswith("[") else repr(descr)
    text = f"{{'descr': {descr_repr}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}".encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    version = b"\x01\x00" if len(text) < 2**16 else b"\x02\x00"
    length = struct.pack("<H" if version == b"\x01\x00" else "<I", len(text))
    return b"\x93NUMPY" + version + length + text


def _rewrite_npz(data: bytes, op: tuple) -> bytes:
    _, _, member, shape, descr, fortran = op
    out = io.BytesIO()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                content = src.read(info)
                if info.filename == member and content[:6] == b"\x93NUMPY":
                    (n,) = struct.unpack_from("<H", content, 8)
                    content = _npy_header(shape, descr, fortran) + content[10 + n :]
                dst.writestr(info.filename, content, compress_type=info.compress_type)
    except Exception:  # an earlier mutation broke the archive (zipfile raises many types): leave it
        return data
    return out.getvalue()


def _render_index(data: bytes, op: tuple, root: Path) -> bytes:
    kind, _, *args = op
    try:
        doc = json.loads(data)
        weight_map = list(doc["weight_map"].items())
    except Exception:  # an earlier mutation broke the index: nothing to rewrite
        return data
    if kind in ("index_set", "index_dup"):
        tensor, shard = args
        shard = str(root / SHARDS[0]) if shard == "<abs>" else shard
        if kind == "index_set":
            weight_map = [(k, v) for k, v in weight_map if k != tensor]
        weight_map.append((tensor, shard))  # a key listed twice in the JSON object when duplicated
        body = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in weight_map)
        return ('{"metadata": ' + json.dumps(doc.get("metadata")) + ', "weight_map": {' + body + "}}").encode()
    if kind == "index_weight_map":
        doc["weight_map"] = args[0]
    elif kind == "index_top":
        doc = args[0]
    else:
        doc.pop(args[0], None)
    return json.dumps(doc).encode()


def apply(s: Sample, ops: list[tuple], root: Path) -> dict[str, bytes]:
    files = dict(s.files)
    for op in ops:
        kind, name = op[0], op[1]
        data = bytearray(files[name])
        if kind == "xor":
            if data:
                data[op[2] % len(data)] ^= op[3]
        elif kind == "overwrite":
            data[op[2] : op[2] + len(op[3])] = op[3]
        elif kind == "truncate":
            del data[op[2] :]
        elif kind == "extend":
            data += op[2]
        elif kind == "set":
            _, _, _, offset, width, value = op
            if offset + width <= len(data):
                data[offset : offset + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif kind == "member_xor":
            _, _, member, offset, mask = op
            local, central, start, size, _ = s.members[name][member]
            if start + size <= len(data):
                data[start + offset] ^= mask
                crc = struct.pack("<I", zlib.crc32(data[start : start + size]))
                data[local + 14 : local + 18] = crc
                data[central + 16 : central + 20] = crc
        elif kind.startswith("st_"):
            data = _rewrite_safetensors(bytes(data), op)
        elif kind == "npy_header":
            data = _rewrite_npz(bytes(data), op)
        elif kind.startswith("index_"):
            data = _render_index(bytes(data), op, root)
        else:
            raise AssertionError(f"unknown mutation {op!r}")
        files[name] = bytes(data)
    return files


# --- the property ---------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {_first_line(exc)}"


def _allocation_failure(exc: BaseException) -> BaseException | None:
    """A MemoryError, or torch's failed-allocation RuntimeError, anywhere in the exception chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, MemoryError) or "DefaultCPUAllocator" in text or "Unable to allocate" in text:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _read_all(target: Path, data_factor: int) -> list[str]:
    """Open and read every tensor; return what exceeded the allocation bound. Raises what the reader raised."""
    problems = []
    with open_checkpoint(target) as ckpt:
        for name in ckpt:
            info = ckpt.info(name)
            tensor = ckpt[name]
            if not isinstance(tensor, torch.Tensor):
                problems.append(f"{name!r}: read gave a {type(tensor).__name__}, not a tensor")
                continue
            nbytes = tensor.numel() * tensor.element_size()
            limit = data_factor * Path(info.file).stat().st_size
            if nbytes > limit:
                problems.append(f"{name!r}: {nbytes} bytes {tuple(tensor.shape)} from a file allowing {limit}")
            del tensor
    return problems


def _examples() -> int:
    return int(os.environ.get(EXAMPLES_ENV) or DEFAULT_EXAMPLES)


# torch warns about the pickle protocol of a mutated file; warnings are not failures here.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
@settings(
    max_examples=_examples(),  # per format: the test is parametrized
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
def test_mutated_checkpoints_fail_only_with_package_errors(fmt, data):
    s = sample(fmt)
    ops = data.draw(mutations(fmt), label="mutations")
    data_factor = DEFLATE_RATIO if fmt == "npz_compressed" else 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = apply(s, ops, root)
        for name, content in files.items():
            (root / name).write_bytes(content)
        total = sum(len(content) for content in files.values())
        escaped = problems = None
        tracemalloc.start()
        try:
            problems = _read_all(root / s.entry, data_factor)
        except LowrankAuditError as exc:
            cause = _allocation_failure(exc)
            if cause is not None:
                raise AssertionError(f"{fmt}: tried an oversized allocation: {_describe(cause)}; {ops!r}") from exc
        except BaseException as exc:  # noqa: B036 - MemoryError, Rust panics (BaseException) and the rest
            if isinstance(exc, KeyboardInterrupt):
                raise
            escaped = exc
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    if escaped is not None:
        raise AssertionError(f"{fmt}: escaped {_describe(escaped)}; {ops!r}") from escaped
    assert not problems, f"{fmt}: tensor larger than its file: {problems}; {ops!r}"
    peak_limit = _PEAK_SLACK + 2 * data_factor * total
    assert peak <= peak_limit, f"{fmt}: traced peak {peak} bytes > {peak_limit} for {total} bytes of files; {ops!r}"


def test_samples_are_valid():
    """The unmutated samples read back exactly, so failures above come from the mutations."""
    for fmt in FORMATS:
        s = sample(fmt)
        want = _tensors(bf16=not fmt.startswith("npz"))
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in s.files.items():
                (Path(tmp) / name).write_bytes(content)
            with open_checkpoint(Path(tmp) / s.entry) as ckpt:
                assert list(ckpt) == sorted(want), fmt
                for name, tensor in want.items():
                    assert ckpt.info(name).shape == tuple(tensor.shape)
                    assert torch.equal(ckpt[name], tensor), (fmt, name)
