"""Peak resident memory of an audit does not grow with the checkpoint.

Writes two synthetic fp16 checkpoints as sharded Hugging Face folders, about 2 GiB and
4 GiB of 2048x2048 matrices, audits each in a fresh process and prints the process's peak
resident set size (``VmHWM``, which counts pages of memory-mapped files too)::

    python benchmarks/memory.py                    # --method randomized --rank-cap 8 (fast)
    python benchmarks/memory.py --method exact     # slower; the same memory bound

Needs about 6 GiB of free space under the temporary folder (``TMPDIR``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SIDE = 2048
SHARD_TENSORS = 64  # 512 MiB of fp16 per shard

CHILD = r"""
import json, sys, time

sys.path.insert(0, "benchmarks")
from _peak import peak_mb


from lowrank_audit.analyses.spectrum import spectrum
path, method, cap, budget = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
start = time.perf_counter()
frame = spectrum(path, device="cpu", method=method, rank_cap=int(cap) if cap != "none" else None, max_batch_mb=budget)
print(json.dumps({"seconds": time.perf_counter() - start, "matrices": len(frame),
                  "peak_mb": peak_mb()}))
"""


def write_folder(folder: Path, tensors: int) -> int:
    """A sharded folder of ``tensors`` fp16 matrices; returns its size in bytes."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(tensors)
    shards = (tensors + SHARD_TENSORS - 1) // SHARD_TENSORS
    weight_map, size = {}, 0
    for shard in range(shards):
        fname = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        names = [
            f"model.layers.{i}.mlp.proj.weight"
            for i in range(shard * SHARD_TENSORS, min(tensors, (shard + 1) * SHARD_TENSORS))
        ]
        save_file({n: (torch.randn(SIDE, SIDE, generator=gen) * 0.02).half() for n in names}, folder / fname)
        weight_map.update(dict.fromkeys(names, fname))
        size += (folder / fname).stat().st_size
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="randomized", choices=["auto", "exact", "randomized"])
    parser.add_argument("--rank-cap", default="8", help="'none' for no cap")
    parser.add_argument("--max-batch-mb", type=float, default=256.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for tensors in (256, 512):  # 2 GiB and 4 GiB of fp16
            folder = Path(tmp) / f"ckpt-{tensors}"
            start = time.perf_counter()
            size = write_folder(folder, tensors)
            written = time.perf_counter() - start
            cmd = [sys.executable, "-c", CHILD, str(folder), args.method, args.rank_cap, str(args.max_batch_mb)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{size / 2**30:.2f} GiB ({tensors} matrices {SIDE}x{SIDE} fp16, written in {written:.0f} s): "
                f"audited in {r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MiB "
                f"(--method {args.method} --rank-cap {args.rank_cap} --max-batch-mb {args.max_batch_mb:g})"
            )


if __name__ == "__main__":
    main()
