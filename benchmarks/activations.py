"""Peak resident memory of ``lowrank-audit activations`` on a dump of about 1 GiB.

Writes a float32 dump (4 modules of 65,536 rows x 1,024 features, 1 GiB) and, in a fresh
process, audits it with the library's ``activations`` (the CLI's call) and prints the
peak resident set size (``VmHWM``, which counts pages of memory-mapped files too) and the
time, next to the time of ``torch.mm`` accumulating XᵀX in float64 over the same rows::

    python benchmarks/activations.py            # needs about 1 GiB free under TMPDIR

The goal (issue 12): under 800 MiB peak for a 1 GiB dump, i.e. memory set by a chunk, not N.
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
CHILD = r"""
import json, sys, time
sys.path.insert(0, "benchmarks")
from _peak import peak_mb
from lowrank_audit.analyses.activations import activations
start = time.perf_counter()
frame = activations([sys.argv[1]], device="cpu")
print(json.dumps({"seconds": time.perf_counter() - start, "modules": len(frame), "peak_mb": peak_mb(),
                  "k95": frame["k95"].tolist()}))
"""


def write_dump(path: Path, modules: int, rows: int, width: int) -> int:
    gen = torch.Generator().manual_seed(0)
    scale = 0.97 ** torch.arange(width, dtype=torch.float32)  # a decaying spectrum
    save_file({f"layers.{i}.proj": torch.randn(rows, width, generator=gen) * scale for i in range(modules)}, path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=4)
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dump.safetensors"
        size = write_dump(path, args.modules, args.rows, args.width)
        done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, cwd=ROOT,
                              check=True)  # fmt: skip
        result = json.loads(done.stdout.strip().splitlines()[-1])
    # The floor: the float64 products alone, on the same rows in the same chunks.
    chunk = torch.randn(8192, args.width, dtype=torch.float64)
    acc = torch.zeros(args.width, args.width, dtype=torch.float64)
    start = time.perf_counter()
    for _ in range(args.modules * args.rows // 8192):
        acc.addmm_(chunk.T, chunk)
    floor = time.perf_counter() - start
    print(f"dump {size / 2**30:.2f} GiB ({args.modules} x [{args.rows}, {args.width}] float32)")
    print(f"activations: {result['seconds']:.1f} s, peak RSS {result['peak_mb']:.0f} MiB, k95 {result['k95']}")
    print(f"float64 XᵀX products alone (torch addmm, 8192-row chunks): {floor:.1f} s")


if __name__ == "__main__":
    main()
