"""What the integrity checks cost: reading every tensor of a checkpoint through
``open_checkpoint`` (headers validated, pickles walked, zip CRC-32 of every torch storage)
against the bare libraries (``torch.load(mmap=True, weights_only=True)``, ``safe_open``).

Writes one fp16 checkpoint of 16 matrices of 4096 x 4096 (512 MiB, the q/k projections of
8 LLaMA-7B layers) in each format, then times, in this process, opening it and summing every
tensor (so every page is read), alternating the two readers::

    python benchmarks/readers.py               # needs about 1 GiB free under TMPDIR
    python benchmarks/readers.py --repeat 9 --layers 4

The first pass over each file warms the page cache and is not counted; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_audit.io.checkpoint import open_checkpoint


def checked(path: Path) -> float:
    with open_checkpoint(path) as ckpt:
        return sum(float(ckpt[name].float().sum()) for name in ckpt)


def bare(path: Path) -> float:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return sum(float(f.get_tensor(name).float().sum()) for name in f.keys())  # noqa: SIM118
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return sum(float(t.float().sum()) for t in state.values())


def seconds(read: Callable[[Path], float], path: Path) -> float:
    start = time.perf_counter()
    read(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="layers of two 4096 x 4096 fp16 matrices (default 8)")
    parser.add_argument("--repeat", type=int, default=7, help="timed passes per reader (default 7)")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    state = {
        f"layers.{i}.{role}.weight": torch.randn(4096, 4096, generator=gen).half()
        for i in range(args.layers)
        for role in ("q_proj", "k_proj")
    }
    size = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        files = {".pt": Path(tmp) / "model.pt", ".safetensors": Path(tmp) / "model.safetensors"}
        torch.save(state, files[".pt"])
        save_file(state, files[".safetensors"])
        del state
        print(f"{size:.0f} MiB of fp16 tensors per file; median of {args.repeat} passes (page cache warm)")
        for suffix, path in files.items():
            checked(path), bare(path)  # warm the page cache
            times: dict[str, list[float]] = {"checked": [], "bare": []}
            for _ in range(args.repeat):
                times["checked"].append(seconds(checked, path))
                times["bare"].append(seconds(bare, path))
            a, b = (statistics.median(times[k]) for k in ("checked", "bare"))
            print(f"{suffix:13s} open_checkpoint {a:.3f} s   bare library {b:.3f} s   ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
