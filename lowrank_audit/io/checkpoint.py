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
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from lowrank_audit.errors import CheckpointError

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

        self._open = lambda: safe_open(str(path), framework="pt")
        self._file: Any = self._open()
        for name in self._file.keys():  # noqa: SIM118 - a safe_open handle, not a dict
            sl = self._file.get_slice(name)
            code = sl.get_dtype()
            dtype = _dtype_name(_SAFETENSORS_DTYPES.get(code), code.lower())
            self.infos[name] = TensorInfo(name, tuple(sl.get_shape()), dtype, path)

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


class _TorchReader(_Reader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tensors: dict[str, torch.Tensor] | None = self._load()
        for name, t in self._tensors.items():
            self.infos[name] = TensorInfo(name, tuple(t.shape), _dtype_name(t.dtype, "?"), path)

    def _load(self) -> dict[str, torch.Tensor]:
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files in the legacy (pre-1.6, non-zip) format cannot be memory-mapped.
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{self.path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
            )
        return dict(_flatten(obj))

    def read(self, name: str) -> torch.Tensor:
        if self._tensors is None:
            self._tensors = self._load()
        return self._tensors[name]

    def release(self) -> None:
        self._tensors = None  # the storages, and with them the memory map, go with the last reference


class _NpzReader(_Reader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._npz = np.load(path, allow_pickle=False)
        for name in self._npz.files:
            with self._npz.zip.open(f"{name}.npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(member)  # the header only, not the data
            self.infos[name] = TensorInfo(name, tuple(shape), _dtype_name(dtype, dtype.str), path)

    def read(self, name: str) -> torch.Tensor:
        # Each member is decompressed into fresh memory; nothing stays mapped.
        return torch.from_numpy(np.ascontiguousarray(self._npz[name]))

    def close(self) -> None:
        self._npz.close()


def _open_file(path: Path) -> _Reader:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return _SafetensorsReader(path)
        if suffix in _TORCH_SUFFIXES:
            return _TorchReader(path)
        if suffix == ".npz":
            return _NpzReader(path)
    except _UNREADABLE as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read {suffix} checkpoint: {reason}") from exc
    raise CheckpointError(
        f"{path}: unknown checkpoint format {suffix or '(no suffix)'!r}; "
        "expected .safetensors, .bin, .pt, .pth, .npz or a model folder"
    )


def _shard_paths(index: Path) -> dict[str, Path]:
    """``name -> shard file`` from a Hugging Face index; shards must stay inside its folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index}: not a valid shard index (need a JSON object with 'weight_map'): {exc}"
        ) from exc
    folder = index.parent.resolve()
    out = {}
    for name, shard in weight_map.items():
        target = (folder / str(shard)).resolve()
        if not target.is_relative_to(folder):
            raise CheckpointError(f"{index}: shard {shard!r} of tensor {name!r} lies outside {folder}")
        out[name] = target
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
        except _UNREADABLE as exc:
            raise CheckpointError(f"{reader.path}: cannot read tensor {name!r}: {exc}") from exc

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
    raise CheckpointError(f"{folder}: no checkpoint in folder; expected one of {', '.join(_FOLDER_ENTRIES)}")


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
        readers = {p: _open_file(p) for p in sorted(set(shards.values()))}
        for name, shard in shards.items():
            if name not in readers[shard].infos:
                raise CheckpointError(f"{entry}: tensor {name!r} is listed in the index but missing from {shard}")
        owner = {name: readers[shard] for name, shard in shards.items()}
        return Checkpoint(path, list(readers.values()), owner, index=entry)
    reader = _open_file(entry)
    return Checkpoint(path, [reader], dict.fromkeys(reader.infos, reader))


__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
