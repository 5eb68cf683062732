"""Integrity checks run on a checkpoint's bytes before any parser trusts them.

A file that comes from anywhere may be truncated, bit-flipped or crafted. The parsers we
hand it to check less than we need: torch does not verify a zip's CRC-32 and maps a storage
record shorter than its tensor by reading past its end; safetensors accepts some
inconsistent headers; NumPy allocates whatever an ``.npy`` header declares. So each format's
structure is checked here first, against the size of the file, and any inconsistency is a
:class:`~lowrank_audit.errors.CheckpointError` naming the file and the tensor or record:

- **safetensors**: the header's length (at most 100 MB, inside the file), its JSON (no
  duplicate names), every dtype and shape, and the byte ranges, which must tile the data
  section exactly (no overlap, no gap, no byte past the end).
- **zip archives** (torch ``.pt/.bin/.pth``, ``.npz``): each record's local header and data
  lie inside the file, with a plausible size; torch's records are stored (uncompressed) and
  their CRC-32 is checked when first read (:meth:`ZipIntegrity.verify`); zipfile checks an
  ``.npz`` member's as it inflates it.
- **torch pickles**: ``data.pkl`` is walked by an unpickler that imports nothing and calls
  nothing (every global becomes an inert stub), which lists each storage (its record, type
  and declared length) and each tensor's extent; every storage must fit its record and every
  tensor its storage. The legacy (pre-zip) format's storages must fit in the file.
- **npz**: no object arrays; each array's declared size fits its member.
"""

from __future__ import annotations

import functools
import io
import json
import math
import pickle
import reprlib
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lowrank_audit.errors import CheckpointError

# safetensors' own cap on the header (its MAX_HEADER_SIZE); larger is a corrupt length field.
MAX_HEADER = 100_000_000
# Bits per element of every safetensors dtype code (the format's, not ours; F4 and F6 pack).
SAFETENSORS_BITS = {
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}  # fmt: skip
# deflate cannot expand more than about 1032:1; a member claiming more lies about its size.
MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 24


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """A library's message as one line for ours (its type's name when it says nothing)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def unique_keys(path: Path, what: str):  # noqa: ANN202 - a json object_pairs_hook
    """Parse JSON objects refusing a key given twice (``json`` keeps the last silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise _fail(path, f"{what} names {key!r} twice")
            seen[key] = value
        return seen

    return hook


# ---------------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str  # the format's code: "F32", "BF16", ...
    shape: tuple[int, ...]
    begin: int  # byte range inside the data section
    end: int


def safetensors_header(path: Path) -> dict[str, SafetensorsEntry]:
    """The tensors a ``.safetensors`` file declares, after checking its structure. The result
    is kept for the file as it is (path, size, modification time): telling an adapter from a
    checkpoint reads the same header the reader then needs.

    Raises:
        CheckpointError: The header length, JSON, a dtype, a shape or a byte range is wrong.
    """
    stat = path.stat()
    return dict(_header(path.resolve(), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _header(path: Path, size: int, mtime: int) -> dict[str, SafetensorsEntry]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or 8 + length > size:
            raise _fail(path, f"corrupt safetensors header length {length} (file has {size} bytes)")
        raw = f.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=unique_keys(path, "the safetensors header"))
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _fail(path, f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _fail(path, "safetensors header is not a JSON object")
    data = size - 8 - length
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise _fail(path, "safetensors __metadata__ is not a map of strings")
            continue
        entries[name] = _entry(path, name, entry, data)
    spans = sorted((e.begin, e.end, name) for name, e in entries.items())
    at, previous = 0, None
    for begin, end, name in spans:
        if begin < at:
            raise _fail(path, f"tensors {previous!r} and {name!r} overlap (bytes {begin}..{at} of the data)")
        if begin > at:
            raise _fail(path, f"bytes {at}..{begin} of the data belong to no tensor (before {name!r})")
        at, previous = end, name
    if at != data:
        raise _fail(path, f"the data section has {data} bytes but its tensors cover {at}")
    return entries


def _entry(path: Path, name: str, entry: Any, data: int) -> SafetensorsEntry:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise _fail(path, f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_BITS:
        raise _fail(path, f"{where}: unknown or unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise _fail(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise _fail(path, f"{where}: data_offsets {offsets!r} is not a pair of integers")
    if not 0 <= offsets[0] <= offsets[1]:
        raise _fail(path, f"{where}: data_offsets {offsets!r} do not make a byte range")
    if offsets[1] > data:
        raise _fail(path, f"{where}: ends at byte {offsets[1]} of a {data}-byte data section (truncated file?)")
    bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
    nbytes = bits // 8
    if bits % 8 or offsets[1] - offsets[0] != nbytes:
        raise _fail(path, f"{where}: {offsets[1] - offsets[0]} bytes stored for shape {shape} {dtype} ({nbytes} bytes)")
    return SafetensorsEntry(dtype, tuple(shape), offsets[0], offsets[1])


# ------------------------------------------------------------------------------------------------ zip

_LOCAL = struct.Struct("<4s5H3I2H")  # local file header, 30 bytes


@dataclass
class ZipIntegrity:
    """The records of a zip archive, their data located and bounded; CRCs checked on demand."""

    path: Path
    records: dict[str, zipfile.ZipInfo]
    starts: dict[str, int]  # where each record's data begins in the file
    verified: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, path: Path, archive: zipfile.ZipFile) -> ZipIntegrity:
        """Locate every record's data and check it lies inside the file, with a plausible size."""
        size = path.stat().st_size
        records, starts = {}, {}
        with open(path, "rb") as f:
            for info in archive.infolist():
                where = f"zip record {info.filename!r}"
                if info.filename in records:
                    raise _fail(path, f"{where} appears twice in the zip directory")
                f.seek(info.header_offset)
                local = f.read(_LOCAL.size)
                if len(local) < _LOCAL.size or local[:4] != b"PK\x03\x04":
                    raise _fail(path, f"{where}: no local header at byte {info.header_offset}")
                fields = _LOCAL.unpack(local)
                start = info.header_offset + _LOCAL.size + fields[-2] + fields[-1]
                stored = info.compress_type == zipfile.ZIP_STORED
                if start + info.compress_size > size:
                    raise _fail(path, f"{where}: its {info.compress_size} bytes run past the end of the file")
                if stored and info.file_size != info.compress_size:
                    raise _fail(path, f"{where}: stored with {info.compress_size} bytes but declares {info.file_size}")
                if not stored and info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 1024:
                    raise _fail(path, f"{where}: declares {info.file_size} bytes from {info.compress_size} compressed")
                records[info.filename], starts[info.filename] = info, start
        return cls(path, records, starts)

    def verify(self, name: str, data: Any = None, tensor: str | None = None) -> None:
        """Check a stored record's CRC-32 (once): over ``data``, a buffer holding the record's
        bytes (a memory-mapped storage: no copy), or else read from the file in 16 MiB chunks.
        ``tensor``, when known, is named in the error with the record."""
        if name in self.verified:
            return
        info, crc = self.records[name], 0
        if data is not None:
            crc = zlib.crc32(data)
        else:
            with open(self.path, "rb") as f:
                f.seek(self.starts[name])
                left = info.compress_size
                while left and (chunk := f.read(min(left, _CHUNK))):
                    crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        if crc != info.CRC:
            of = f" (storage of tensor {tensor!r})" if tensor is not None else ""
            raise _fail(
                self.path,
                f"zip record {name!r}{of} is corrupt: CRC-32 {crc:08x}, the directory says {info.CRC:08x}",
            )
        self.verified.add(name)


# ------------------------------------------------------------------------------------- torch pickles


# Longest global name (module.qualname) and tensor name a walked pickle may hold: real ones are
# far shorter, and a memoised megabyte-long string reused in either would cost memory per use.
MAX_NAME = 4096


class _Stub:
    """What every global becomes: inert, it accepts any arguments and any state, whether the
    pickle calls it (REDUCE) or only allocates it (NEWOBJ, OBJ, INST)."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        self = object.__new__(cls)
        self.args, self.items = args, {}
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # OrderedDict's SETITEMS
        self.items[key] = value

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


@dataclass(frozen=True, slots=True)  # slots: a BUILD opcode cannot rewrite its fields through __dict__
class StorageRef:
    key: str
    itemsize: int  # of the storage's own type (1 for UntypedStorage: numel counts bytes)
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def __setstate__(self, state: Any) -> None:  # a BUILD opcode on a storage: never a real checkpoint's
        raise TypeError("a storage reference takes no state")


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    itemsize: int


def _dtype_sizes() -> dict[str, int]:
    import torch
    from torch.storage import _dtype_to_storage_type_map

    sizes = {name: dtype.itemsize for dtype, name in _dtype_to_storage_type_map().items()}
    sizes["UntypedStorage"] = 1
    dtypes = {str(d).removeprefix("torch."): d.itemsize for d in vars(torch).values() if isinstance(d, torch.dtype)}
    return sizes | {f"dtype:{k}": v for k, v in dtypes.items()}


class _InertUnpickler(pickle._Unpickler):  # noqa: SLF001 - the Python unpickler: its memo is a dict
    """Unpickles structure only: globals are stubs, so nothing is imported or run.

    The pure-Python unpickler, not the C one: the C unpickler sizes its memo table by the
    largest index a pickle names, so ``LONG_BINPUT 2**31`` would allocate 16 GB.
    """

    def __init__(self, file: BinaryIO, path: Path, sizes: dict[str, int]) -> None:
        super().__init__(file)
        self.path, self.sizes = path, sizes
        self.storages: dict[str, StorageRef] = {}
        self.classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> type:
        if not isinstance(module, str) or not isinstance(name, str) or len(module) + len(name) > MAX_NAME:
            raise _fail(self.path, "the pickle names a global that is not a short string")
        key = (module, name)
        if key not in self.classes:
            self.classes[key] = type("Stub", (_Stub,), {"qualname": f"{module}.{name}"})
        return self.classes[key]

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise _fail(self.path, f"unexpected persistent id in the pickle ({type(pid).__name__})")
        kind, key, numel = pid[1], pid[2], pid[4]
        name = getattr(kind, "qualname", "?").rsplit(".", 1)[-1]
        if name not in self.sizes or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _fail(self.path, f"storage {reprlib.repr(key)} has an unknown type or size")
        ref = StorageRef(key, self.sizes[name], numel)
        if self.storages.setdefault(key, ref) != ref:
            raise _fail(self.path, f"storage {reprlib.repr(key)} is declared twice with different sizes")
        return ref


_REBUILDS = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3"}
_WRAPPERS = {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}
_ORDERED = "collections.OrderedDict"


def _tensor(path: Path, name: str, stub: _Stub, sizes: dict[str, int]) -> TensorRef | None:
    """The tensor a rebuild call stands for, its extent checked; None for any other call
    (the storages it holds are still CRC-checked: :func:`check_torch_zip`)."""
    if stub.qualname in _WRAPPERS and stub.args and isinstance(stub.args[0], _Stub):
        return _tensor(path, name, stub.args[0], sizes)
    if stub.qualname not in _REBUILDS:
        return None
    args = stub.args
    storage, offset, shape, stride = (args + (None,) * 4)[:4]
    ints = lambda v: isinstance(v, tuple) and all(type(i) is int and i >= 0 for i in v)  # noqa: E731
    if not isinstance(storage, StorageRef) or type(offset) is not int or offset < 0 or not ints(shape):
        raise _fail(path, f"tensor {name!r}: malformed record in the pickle")
    if not ints(stride) or len(stride) != len(shape):
        raise _fail(path, f"tensor {name!r}: malformed strides in the pickle")
    itemsize = storage.itemsize
    if stub.qualname.endswith("_v3"):
        dtype = args[6] if len(args) > 6 else None
        itemsize = sizes.get(f"dtype:{getattr(dtype, 'qualname', '?').rsplit('.', 1)[-1]}", 0)
        if not itemsize:
            raise _fail(path, f"tensor {name!r}: unknown dtype in the pickle")
    ref = TensorRef(storage, offset, shape, stride, itemsize)
    reach = 0 if 0 in shape else offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
    if reach * itemsize > storage.nbytes:
        raise _fail(
            path,
            f"tensor {name!r} of shape {list(shape)} reaches byte {reach * itemsize} of storage "
            f"{storage.key!r}, which holds {storage.nbytes}",
        )
    return ref


def _items(obj: Any) -> list[tuple[Any, Any]]:
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, _Stub):
        pairs = list(obj.items.items())
        if obj.qualname == _ORDERED and obj.args and isinstance(obj.args[0], list):  # OrderedDict([(k, v), ...])
            pairs += [p for p in obj.args[0] if isinstance(p, tuple) and len(p) == 2]
        return pairs
    return []


def _walk(path: Path, root: Any) -> Iterator[tuple[str, _Stub]]:
    """``(dotted name, rebuild call)`` of every tensor of a nested state dict, as the reader names them."""
    stack = [(root, "")]
    while stack:  # not recursive: a pickle may nest thousands of levels
        node, at = stack.pop()
        for key, value in _items(node):
            name = f"{at}{key}" if isinstance(key, (str, int)) and len(at) < MAX_NAME else None
            if name is None or len(name) > MAX_NAME:
                raise _fail(path, "a tensor name in the pickle is not a short string")
            if isinstance(value, _Stub) and (value.qualname in _REBUILDS or value.qualname in _WRAPPERS):
                yield name, value
            elif isinstance(value, (dict, _Stub)):
                stack.append((value, f"{name}."))


def _well_formed(path: Path, data: BinaryIO, what: str) -> None:
    """Walk a pickle's opcodes (pickletools reads each declared length and checks it against
    what is left) before unpickling it: an unpickler allocates a BYTEARRAY8 of its declared
    length before reading it, so a corrupt length would be an allocation of up to 2^64 bytes."""
    import pickletools

    start = data.tell()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickletools warns about odd escapes in damaged strings
            for _ in pickletools.genops(data):
                pass
    except Exception as exc:  # noqa: BLE001 - whatever a damaged opcode stream makes pickletools raise
        raise _fail(path, f"{what} is malformed ({type(exc).__name__}: {reprlib.repr(str(exc))})") from None
    data.seek(start)


def scan_pickle(path: Path, data: BinaryIO) -> tuple[dict[str, StorageRef], dict[str, TensorRef]]:
    """Storages and tensors a torch pickle declares, without importing or running anything.

    Raises:
        CheckpointError: The pickle is malformed, or a tensor reaches past its storage.
    """
    sizes = _dtype_sizes()
    _well_formed(path, data, "the pickle")
    unpickler = _InertUnpickler(data, path, sizes)
    try:
        root = unpickler.load()
        tensors = {}
        for name, stub in _walk(path, root):
            ref = _tensor(path, name, stub, sizes)
            if ref is not None:
                tensors[name] = ref
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a hostile pickle makes the walk raise
        raise _fail(path, f"the pickle is malformed ({type(exc).__name__}: {reprlib.repr(str(exc))})") from None
    return unpickler.storages, tensors


def pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global a pickle refers to, read from its opcodes (nothing is
    run); Python 2 module names (``__builtin__``) are given their Python 3 names, as unpickling does."""
    import pickletools
    from _compat_pickle import IMPORT_MAPPING

    found: list[str] = []
    strings: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pickletools warns about odd escapes in damaged strings
        try:
            for op, arg, _ in pickletools.genops(data):
                if op.name in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    found.append(f"{IMPORT_MAPPING.get(module, module)}.{name}")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # noqa: BLE001, S110 - a damaged tail: what was read so far is the answer
            pass
    return found


def check_torch_zip(path: Path, archive: zipfile.ZipFile) -> tuple[ZipIntegrity, dict[str, str]]:
    """A zip-format torch checkpoint: records bounded, ``data.pkl`` verified and scanned,
    every storage's record present and long enough.

    The CRC-32 of a storage that a plain state-dict tensor stands on is checked when that
    tensor is first read (over its mapped bytes, once per record); every other storage the
    pickle references (tensors rebuilt another way: subclasses, tensors with attributes,
    OrderedDicts built from lists) is checked here.

    Returns:
        The archive's records, and ``tensor name -> storage record`` for the checks on read.
    """
    records = ZipIntegrity.open(path, archive)
    pickles = [n for n in records.records if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise _fail(path, "not a torch zip checkpoint: no single <prefix>/data.pkl record")
    pkl = pickles[0]
    compressed = [n for n, info in records.records.items() if info.compress_type != zipfile.ZIP_STORED]
    if compressed:  # torch writes every record stored, and maps storages in place
        raise _fail(path, f"zip record {compressed[0]!r} is compressed; a torch checkpoint stores its records as is")
    records.verify(pkl)
    prefix = pkl.removesuffix("data.pkl")
    storages, tensors = scan_pickle(path, io.BytesIO(archive.read(pkl)))
    for key, ref in storages.items():
        record = f"{prefix}data/{key}"
        if record not in records.records:
            raise _fail(path, f"storage record {record!r} is missing from the archive")
        have = records.records[record].file_size
        if have < ref.nbytes:  # torch would map the storage past the record's end
            raise _fail(path, f"zip record {record!r} holds {have} bytes but its storage declares {ref.nbytes}")
    claimed = {name: f"{prefix}data/{ref.storage.key}" for name, ref in tensors.items()}
    for record in sorted({f"{prefix}data/{key}" for key in storages} - set(claimed.values())):
        records.verify(record)
    return records, claimed


class _Bounded(io.RawIOBase):
    """A file whose reads never ask for more than is left: a corrupt length field in a pickle
    becomes a short read (and an error), not an allocation of that many bytes."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        return self.f.readinto(view[: max(0, min(len(view), self.size - self.f.tell()))])

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        return self.f.readline(1 << 16 if limit is None or limit < 0 else limit)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.f.seek(offset, whence)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER


def refusal(path: Path, named: str | None, pickled: bytes, reason: str = "") -> CheckpointError:
    """A pickle that would import or run something: say what (from its own opcodes) and what to do.

    ``named`` is the global the refusing unpickler gave, if any (torch drops a builtin's
    module: "exec"); otherwise the first global outside torch's and collections' is named,
    and with none, the refusal is given as ``reason`` (an opcode torch does not admit).
    """
    found = pickle_globals(pickled)
    if named:
        what = next((g for g in found if g == named or g.endswith("." + named)), named)
    else:
        what = next((g for g in found if not g.startswith(("torch.", "collections."))), None)
    if what is None:
        return CheckpointError(f"{path}: torch.load(weights_only=True) refused it: {reason or 'not a checkpoint'}")
    return CheckpointError(
        f"{path}: refused to unpickle {what}: checkpoints load with weights_only=True, which admits tensors and "
        "plain containers only; if you trust this file, convert it to .safetensors where it was made"
    )


def _inert_load(path: Path, f: Any, what: str) -> Any:
    _well_formed(path, f, what)
    try:
        return _InertUnpickler(f, path, {}).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged pickle makes the unpickler raise
        raise _fail(path, f"{what} is malformed ({type(exc).__name__}: {reprlib.repr(str(exc))})") from None


def check_torch_legacy(path: Path) -> None:
    """A legacy (pre-1.6, non-zip) torch file, walked as torch reads it: the magic number,
    protocol and system-info pickles, the state-dict pickle (storages listed, tensors within
    them), the list of storage keys, then each storage as an 8-byte element count (equal to
    the declared one) and its bytes, all inside the file.

    Raises:
        CheckpointError: Any of these is missing, malformed or larger than the file; a pickle
            that is not a torch checkpoint but names other globals is refused naming them.
    """
    size = path.stat().st_size
    with open(path, "rb") as raw:
        f = _Bounded(raw, size)
        magic = _inert_load(path, f, "the file's first pickle")
        if magic != _LEGACY_MAGIC:
            raw.seek(0)
            head = raw.read(1 << 20)
            if any(not g.startswith(("torch.", "collections.")) for g in pickle_globals(head)):
                raise refusal(path, None, head)
            raise _fail(path, "not a PyTorch checkpoint (neither a zip archive nor the legacy format's magic number)")
        if type(_inert_load(path, f, "the protocol version")) is not int:
            raise _fail(path, "the legacy header's protocol version is not an integer")
        _inert_load(path, f, "the system information")
        storages, _ = scan_pickle(path, f)
        keys = _inert_load(path, f, "the list of storage keys")
        if (
            not isinstance(keys, list)
            or not all(isinstance(k, str) for k in keys)
            or len(keys) != len(storages)
            or set(keys) != set(storages)
        ):
            raise _fail(path, "the list of storage keys does not match the storages of the state dict")
        for key in keys:
            ref = storages[key]
            count = raw.read(8)
            if len(count) < 8 or struct.unpack("<q", count)[0] != ref.numel:
                raise _fail(path, f"storage {key!r}: its stored length does not match the declared {ref.numel}")
            end = raw.tell() + ref.numel * ref.itemsize
            if end > size:
                raise _fail(path, f"storage {key!r} runs {end - size} bytes past the end of the file (truncated?)")
            raw.seek(end)


# ---------------------------------------------------------------------------------------------- npz


@dataclass(frozen=True)
class NpyMember:
    record: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    header: int  # bytes of magic and header before the data


def npz_members(path: Path, archive: zipfile.ZipFile) -> tuple[ZipIntegrity, dict[str, NpyMember]]:
    """The arrays of an ``.npz``, their headers read and their sizes checked against the members."""
    records = ZipIntegrity.open(path, archive)
    out = {}
    for record, info in records.records.items():
        name = record.removesuffix(".npy")
        where = f"array {name!r}"
        try:
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(member, max_header_size=1 << 20)
                header = member.tell()
        except Exception as exc:  # noqa: BLE001 - NumPy parses the header with ast and tokenize: any of theirs
            raise _fail(path, f"{where}: unreadable .npy header ({first_line(exc, 80)})") from None
        if dtype.hasobject:
            raise _fail(path, f"{where} holds Python objects (dtype {dtype.str}); such arrays are never unpickled")
        nbytes = math.prod(shape) * dtype.itemsize
        if header + nbytes > info.file_size:
            held = info.file_size - header
            raise _fail(path, f"{where}: declares {list(shape)} {dtype} ({nbytes} bytes) but its member holds {held}")
        out[name] = NpyMember(record, tuple(shape), dtype, fortran, header)
    return records, out


__all__ = ["MAX_HEADER", "NpyMember", "SafetensorsEntry", "ZipIntegrity", "check_torch_legacy", "check_torch_zip",
           "first_line", "npz_members", "pickle_globals", "refusal", "safetensors_header", "scan_pickle",
           "unique_keys"]  # fmt: skip
