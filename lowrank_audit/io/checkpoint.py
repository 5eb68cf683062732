"""Open any checkpoint as a lazy, read-only ``name -> tensor`` mapping.

Formats: a ``.safetensors`` file; a Hugging Face model folder (``model.safetensors``,
sharded ``model.safetensors.index.json``, ``pytorch_model.bin`` or its sharded index);
PyTorch ``.bin/.pt/.pth`` files, unpickled only with ``weights_only=True`` and memory
mapped; and NumPy ``.npz`` archives (never unpickled). Tensors are read one at a time,
when asked for, in their stored dtype; upcasting is the engine's job.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from lowrank_audit.errors import CheckpointError
from lowrank_audit.io import integrity

# safetensors header dtype codes -> torch dtypes (the codes are the format's, not ours).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# What the parsers raise on a corrupt, truncated or unsafe file (weights_only refusals
# are UnpicklingError); anything else is our bug and keeps its traceback.
_UNREADABLE = (
    OSError,
    ValueError,
    RuntimeError,
    EOFError,
    KeyError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    SafetensorError,
)
_TORCH_SUFFIXES = {".bin", ".pt", ".pth"}
# Folder layouts, in the order Hugging Face's loaders prefer them.
_FOLDER_ENTRIES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a stored tensor without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name without the prefix: "float32", "bfloat16", "int64", ...
    file: Path

    @property
    def is_floating(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and stored bits: a copy of a tensor holding NaN equals it (``torch.equal`` says not)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(view), b.contiguous().view(view)
    return torch.equal(a, b)


def _dtype_name(dtype: torch.dtype | np.dtype | None, fallback: str) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, np.dtype) and dtype.kind in "fiub":
        return dtype.name
    return fallback


class _Reader(ABC):
    """One file's tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.infos: dict[str, TensorInfo] = {}  # filled by the subclass from the file's header

    @abstractmethod
    def read(self, name: str) -> torch.Tensor: ...

    def release(self) -> None:  # noqa: B027 - optional hook: readers without mappings hold nothing
        """Drop open handles and memory maps; the next :meth:`read` opens the file again."""

    def close(self) -> None:
        self.release()


class _SafetensorsReader(_Reader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from safetensors import safe_open

        for name, entry in integrity.safetensors_header(path).items():
            dtype = _dtype_name(_SAFETENSORS_DTYPES.get(entry.dtype), entry.dtype.lower())
            self.infos[name] = TensorInfo(name, entry.shape, dtype, path)
        self._open = lambda: safe_open(str(path), framework="pt")
        self._file: Any = self._open()

    def read(self, name: str) -> torch.Tensor:
        if self._file is None:
            self._file = self._open()
        return self._file.get_tensor(name)

    def release(self) -> None:
        # safe_open memory-maps the whole file; every page a read touched stays resident
        # until the map goes, so dropping the handle is what bounds memory per batch.
        self._file = None


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a (possibly nested) state dict, with dotted names; other values are skipped."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")


def _refused(path: Path, exc: pickle.UnpicklingError, pickled: bytes) -> CheckpointError:
    """torch's weights_only refusal, as one line: what was refused and what to do."""
    text = str(exc)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    why = re.search(r"WeightsUnpickler error: ([^\n]*)", text) or re.search(r"[^\n]*Unsupported[^\n]*", text)
    reason = (why[1] if why and why.lastindex else why[0] if why else integrity.first_line(exc)).strip()
    return integrity.refusal(path, named[1] if named else None, pickled, reason)


class _TorchReader(_Reader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with open(path, "rb") as f:
            self._zip = f.read(4) == b"PK\x03\x04"
        self._records: integrity.ZipIntegrity | None = None
        self._storage_of: dict[str, str] = {}
        if self._zip:
            with zipfile.ZipFile(path) as archive:
                self._records, self._storage_of = integrity.check_torch_zip(path, archive)
        else:
            integrity.check_torch_legacy(path)
        self._tensors: dict[str, torch.Tensor] | None = self._load()
        for name, t in self._tensors.items():
            self.infos[name] = TensorInfo(name, tuple(t.shape), _dtype_name(t.dtype, "?"), path)

    def _load(self) -> dict[str, torch.Tensor]:
        try:
            # Files in the legacy (pre-1.6, non-zip) format cannot be memory-mapped.
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=self._zip)
        except pickle.UnpicklingError as exc:
            raise _refused(self.path, exc, self._pickle_bytes()) from exc
        except Exception as exc:  # noqa: BLE001 - torch's parser on a damaged file raises IndexError, AssertionError, ...
            raise CheckpointError(
                f"{self.path}: cannot read {self.path.suffix} checkpoint: {integrity.first_line(exc)}"
            ) from exc
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{self.path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
            )
        return dict(_flatten(obj))

    def _pickle_bytes(self) -> bytes:
        if not self._zip:
            return self.path.read_bytes()[: 1 << 20]
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))

    def read(self, name: str) -> torch.Tensor:
        if self._tensors is None:
            self._tensors = self._load()
        tensor = self._tensors[name]
        record = self._storage_of.get(name)
        if self._records is not None and record is not None:
            # A storage is its record's bytes, memory-mapped: the CRC-32 reads them in place (once per record).
            storage = tensor.untyped_storage()
            whole = storage.nbytes() == self._records.records[record].file_size
            data = torch.empty(0, dtype=torch.uint8).set_(storage).numpy() if whole else None
            self._records.verify(record, data, tensor=name)
        return tensor.detach()  # a saved Parameter keeps requires_grad: nothing here is differentiated

    def release(self) -> None:
        self._tensors = None  # the storages, and with them the memory map, go with the last reference


class _NpzReader(_Reader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._archive = zipfile.ZipFile(path)
        _, self._members = integrity.npz_members(path, self._archive)
        for name, m in self._members.items():
            self.infos[name] = TensorInfo(name, m.shape, _dtype_name(m.dtype, m.dtype.str), path)

    def read(self, name: str) -> torch.Tensor:
        # Each member is inflated into fresh memory of its declared size (checked against the
        # member's); zipfile checks the CRC-32 on reaching its end. Nothing stays mapped.
        m = self._members[name]
        if m.dtype.kind not in "biufc" or m.dtype.itemsize > 8 * (1 + (m.dtype.kind == "c")):
            raise CheckpointError(f"{self.path}: array {name!r} has dtype {m.dtype.str}, which torch cannot hold")
        array = np.empty(m.shape[::-1] if m.fortran else m.shape, m.dtype)
        with self._archive.open(m.record) as member:
            member.read(m.header)
            if member.readinto(memoryview(array.reshape(-1)).cast("B")) != array.nbytes:
                raise CheckpointError(f"{self.path}: array {name!r} is shorter than its header declares")
            while member.read(1 << 20):  # to the end, where zipfile compares the CRC-32
                pass
        array = array.T if m.fortran else array
        if not m.dtype.isnative:
            array = array.astype(m.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(array))

    def close(self) -> None:
        self._archive.close()


def _open_file(path: Path) -> _Reader:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return _SafetensorsReader(path)
        if suffix in _TORCH_SUFFIXES:
            return _TorchReader(path)
        if suffix == ".npz":
            return _NpzReader(path)
    except CheckpointError:
        raise
    except _UNREADABLE as exc:
        raise CheckpointError(f"{path}: cannot read {suffix} checkpoint: {integrity.first_line(exc)}") from exc
    raise CheckpointError(
        f"{path}: unknown checkpoint format {suffix or '(no suffix)'!r}; "
        "expected .safetensors, .bin, .pt, .pth, .npz or a model folder"
    )


def _shard_paths(index: Path) -> dict[str, Path]:
    """``name -> shard file`` from a Hugging Face index. Shard names are relative paths inside
    the index's folder (no absolute paths, no ``..``); symlinks among them are followed, as
    in the Hugging Face cache, whose snapshot folders link each file into ``blobs/``."""
    try:
        text = index.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read shard index: {exc.strerror or exc}") from exc
    try:
        weight_map = json.loads(text, object_pairs_hook=integrity.unique_keys(index, "the shard index"))["weight_map"]
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index}: not a valid shard index (need a JSON object with 'weight_map'): {integrity.first_line(exc)}"
        ) from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' is not an object of tensor names to shard files")
    out = {}
    for name, shard in weight_map.items():
        relative = PurePosixPath(shard) if isinstance(shard, str) else None
        if relative is None or not shard or relative.is_absolute() or ".." in relative.parts or "\\" in shard:
            raise CheckpointError(
                f"{index}: shard {shard!r} of tensor {name!r} is not a file name inside {index.parent}"
            )
        out[name] = index.parent / relative
    return out


class Checkpoint(Mapping[str, torch.Tensor]):
    """A read-only, lazy mapping from tensor name to tensor, over one or more files.

    Use :func:`open_checkpoint` to make one, preferably as a context manager. Names
    iterate in sorted order, so everything downstream is order-independent.
    """

    def __init__(
        self, path: Path, readers: list[_Reader], owner: dict[str, _Reader], index: Path | None = None
    ) -> None:
        self.path = path
        self._index = index
        self._readers = readers
        self._owner = owner
        self._infos = {name: reader.infos[name] for name, reader in sorted(owner.items())}

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file this checkpoint reads (shard index first), for provenance."""
        return ((self._index,) if self._index else ()) + tuple(r.path for r in self._readers)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        reader = self._owner[name]
        try:
            return reader.read(name)
        except CheckpointError:
            raise
        except _UNREADABLE as exc:
            raise CheckpointError(f"{reader.path}: cannot read tensor {name!r}: {integrity.first_line(exc)}") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def release(self) -> None:
        """Drop every memory map: pages read so far stop counting as resident memory.

        Reading again reopens the files; the engine calls this after each batch.
        """
        for reader in self._readers:
            reader.release()

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve_folder(folder: Path) -> Path:
    for entry in _FOLDER_ENTRIES:
        if (folder / entry).is_file():
            return folder / entry
    raise CheckpointError(
        f"{folder}: no checkpoint in folder; expected one of {', '.join(_FOLDER_ENTRIES)}, or adapter_config.json"
    )


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint file or model folder without reading tensor data.

    Args:
        path: A ``.safetensors``, ``.bin``, ``.pt``, ``.pth`` or ``.npz`` file, a
            ``*.index.json`` shard index, or a Hugging Face model folder.

    Returns:
        A lazy :class:`Checkpoint`; tensors are read on access.

    Raises:
        CheckpointError: The path does not exist, is not a known format, is
            truncated or corrupt, would need unsafe unpickling, or an index points
            outside its folder.

    Example:
        >>> with open_checkpoint("sample_checkpoints/base.safetensors") as ckpt:
        ...     ckpt.info("lm_head.weight").shape
        (96, 64)
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    entry = _resolve_folder(path) if path.is_dir() else path
    if entry.name.endswith(".index.json"):
        shards = _shard_paths(entry)
        readers = {}
        for shard in sorted(set(shards.values())):
            try:
                found = shard.is_file()
            except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
                raise CheckpointError(f"{entry}: shard {str(shard)[:200]!r}: {integrity.first_line(exc)}") from exc
            if not found:
                first = next(n for n, s in shards.items() if s == shard)
                raise CheckpointError(f"{entry}: shard {shard} (of tensor {first!r}) is missing")
            readers[shard] = _open_file(shard)
        holders: dict[str, Path] = {}
        for shard, reader in readers.items():
            for name in reader.infos:
                if name in holders:
                    raise CheckpointError(f"tensor {name!r} is stored in two shards: {holders[name]} and {shard}")
                holders[name] = shard
        for name, shard in shards.items():
            if name not in readers[shard].infos:
                raise CheckpointError(f"{entry}: tensor {name!r} is listed in the index but missing from {shard}")
        owner = {name: readers[shard] for name, shard in shards.items()}
        return Checkpoint(path, list(readers.values()), owner, index=entry)
    reader = _open_file(entry)
    return Checkpoint(path, [reader], dict.fromkeys(reader.infos, reader))


__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint", "same_bits"]
