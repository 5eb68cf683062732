"""One process against several under torchrun, on a fine-tune pair of a few GB.

Writes a LLaMA-7B-shaped base and fine-tune pair (``benchmarks/finetunes.py``: per layer
the seven projections, fp16, the update scaled so that storage rounding holds 1.5 % of its
energy), then times, as whole processes and alternating which goes first:

- ``lowrank-audit spectrum FT --base BASE --device cpu --out one.parquet -q`` with all cores;
- ``python -m torch.distributed.run --standalone --nproc-per-node N -m lowrank_audit spectrum ...``,
  each process with cores / N threads;
- the single process again with cores / N threads: what each of the N processes has, so the
  ratio to the sharded run is the scaling when every process brings its own cores or GPU;

and prints the largest |Δσ|/σ₁ between the two reports (it exits if their rows differ). The
same three runs on the 0.4 MiB sample pair measure start-up alone (imports, torchrun,
joining the group), which the ratios are also given net of.
It also times each matrix shape alone in this process (``--include``), the per-matrix
figure a projection to larger models starts from, and prints the projection for a
LLaMA-2-70B pair on ``--project-gpus`` processes under the assumptions it states.

Run by hand (about 5 minutes with ``--repeats 3`` on 2 CPU cores)::

    python benchmarks/distributed.py                 # 3 layers: 1.1 GiB per checkpoint
    python benchmarks/distributed.py --layers 1 --repeats 1 --keep /tmp/pair
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from finetunes import LLAMA_7B, finetune_pair, llama_shapes, save_pair

import lowrank_audit

# LLaMA-2-70B: 80 layers, hidden 8192, MLP 28672, grouped-query attention with 8 KV heads of 128.
LLAMA_70B = {"layers": 80, "hidden": 8192, "intermediate": 28672, "kv": 1024, "vocab": 32000}


def whole(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start


def same(one: Path, two: Path) -> float:
    """Largest |Δσ| / σ₁ between the reports; exits if rows or order differ."""
    a, b = pd.read_parquet(one), pd.read_parquet(two)
    if a["name"].tolist() != b["name"].tolist():
        sys.exit("the reports differ in rows or order")
    worst = 0.0
    for x, y in zip(a["singular_values"], b["singular_values"], strict=True):
        x, y = np.asarray(x), np.asarray(y)
        k = min(len(x), len(y))
        worst = max(worst, float(np.max(np.abs(x[:k] - y[:k]))) / float(x[0]))
    return worst


def per_shape(ft: Path, base: Path) -> dict[tuple[int, int], float]:
    """Seconds per matrix of each shape, one shape at a time in this process (imports excluded)."""
    frame = lowrank_audit.spectrum(ft, base=base, device="cpu", hashed=False)  # warm-up, and the shapes
    out = {}
    for (rows, cols), group in frame.groupby(["rows", "cols"]):
        start = time.perf_counter()
        lowrank_audit.spectrum(ft, base=base, device="cpu", include=list(group["name"]), hashed=False)
        out[(int(rows), int(cols))] = (time.perf_counter() - start) / len(group)
    return out


def project(seconds: dict[tuple[int, int], float], gpus: int, read_gbps: float) -> None:
    """A 70B pair on ``gpus`` processes: bytes to read and matrices per shape; compute scaled
    from the measured shapes by m·n (the randomized sketch's work at a fixed width)."""
    h, f, kv, layers = LLAMA_70B["hidden"], LLAMA_70B["intermediate"], LLAMA_70B["kv"], LLAMA_70B["layers"]
    shapes = {(h, h): 2 * layers, (kv, h): 2 * layers, (f, h): 2 * layers, (h, f): layers}
    params = sum(m * n * c for (m, n), c in shapes.items()) + 2 * LLAMA_70B["vocab"] * h
    nbytes = 2 * params * 2  # fp16, base and fine-tune
    per_mn = statistics.median(s / (m * n) for (m, n), s in seconds.items())
    compute = sum(per_mn * m * n * c for (m, n), c in shapes.items())
    print(f"\nprojection: LLaMA-2-70B pair, fp16: {nbytes / 1e9:.0f} GB to read; matrices per shape: "
          + ", ".join(f"{c} x {m}x{n}" for (m, n), c in shapes.items()))  # fmt: skip
    print(f"  measured here: {per_mn * 1e9:.2f} s per 1e9 entries (CPU, {torch.get_num_threads()} threads; the "
          "exact k/v_proj counted at that rate too) -> "
          f"{compute / 3600:.1f} hours "
          f"of decomposition here; over {gpus} such machines {compute / gpus / 60:.0f} min each")  # fmt: skip
    print(f"  reading at {read_gbps:g} GB/s (one node's disk, shared by its {gpus} processes): "
          f"{nbytes / 1e9 / read_gbps / 60:.1f} min; that bounds the run from below on any device")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="write (or reuse) the pair in this folder")
    parser.add_argument("--project-gpus", type=int, default=8)
    parser.add_argument("--read-gbps", type=float, default=5.0, help="disk read rate assumed by the projection")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="lowrank-audit-dist-"))
    base, ft = folder / "base.safetensors", folder / "finetuned.safetensors"
    if not ft.exists():
        shapes = llama_shapes(LLAMA_7B["hidden"], LLAMA_7B["intermediate"])
        save_pair(finetune_pair(shapes, args.layers, floor_share=0.015), folder)
    size = (ft.stat().st_size + base.stat().st_size) / 2**30
    print(f"pair: {args.layers} LLaMA-7B layer(s), fp16, {size:.2f} GiB to read in all ({folder})")
    cores = os.cpu_count() or 2
    threads = max(1, cores // args.nproc)  # torchrun's default is 1 per process
    samples = Path(__file__).resolve().parent.parent / "sample_checkpoints"
    medians = {}
    # The sample pair (0.4 MiB) first: start-up alone (imports, torchrun, joining the group).
    for what, (f, b) in (("start-up", (samples / "finetuned.safetensors", samples / "base.safetensors")),
                         ("audit", (ft, base))):  # fmt: skip
        common = ["spectrum", str(f), "--base", str(b), "--device", "cpu", "-q", "--force"]
        one = [sys.executable, "-m", "lowrank_audit", *common, "--out", str(folder / "one.parquet")]
        two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "lowrank_audit", *common, "--out", str(folder / "two.parquet")]  # fmt: skip
        runs = [  # (label, command, threads per process)
            (f"1 process x {cores} threads", one, cores),
            (f"{args.nproc} processes x {threads} threads", two, threads),
            (f"1 process x {threads} threads", one, threads),  # what each of the N processes gets
        ]
        times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
        for r in range(args.repeats):
            for label, cmd, n in runs if r % 2 == 0 else runs[::-1]:
                times[label].append(whole(cmd, os.environ | {"OMP_NUM_THREADS": str(n)}))
                print(f"  {what}, {label}: {times[label][-1]:.1f} s", flush=True)
        medians[what] = [statistics.median(t) for t in times.values()]
        shown = (f"{label} {m:.1f} s" for label, m in zip(times, medians[what], strict=True))
        print(f"{what} medians: " + ", ".join(shown))
    (wide, sharded, narrow), start = medians["audit"], medians["start-up"]
    net = [m - s for m, s in zip(medians["audit"], start, strict=True)]
    print(f"{args.nproc} processes against 1 process on all {cores} cores: {wide / sharded:.2f}x "
          f"(net of start-up {net[0] / net[1]:.2f}x); against 1 process on {threads} thread(s), what each process "
          f"has: {narrow / sharded:.2f}x (net of start-up {net[2] / net[1]:.2f}x)")  # fmt: skip
    print(f"largest |Δσ|/σ₁ between the reports: {same(folder / 'one.parquet', folder / 'two.parquet'):.1e}")
    seconds = per_shape(ft, base)
    for (m, n), s in seconds.items():
        print(f"  {m}x{n}: {s:.2f} s per matrix (in-process, {torch.get_num_threads()} threads)")
    project(seconds, args.project_gpus, args.read_gbps)


if __name__ == "__main__":
    main()
