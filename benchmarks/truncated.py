"""Energy ranks of LLaMA-7B-shaped matrices: ``--method auto`` against exact ``svdvals``.

Writes a synthetic fp16 checkpoint of ``--count`` 4096x4096 (attention) and 4096x11008
(MLP) matrices with power-law spectra plus a noise floor, then times, in this process:

- ``lowrank_audit.spectrum(path, method="auto")`` (randomized, adaptive k), and
- the plain loop: every matrix upcast to float32 and passed to ``torch.linalg.svdvals``,
  energy ranks from the full spectrum.

and reports the speed-up and the largest relative k95 difference. With ``--device cuda``
both run on the GPU, and the script also times moving the checkpoint's bytes from pinned
host memory to the device: the floor that no audit reading from the host can beat. Run
by hand (exact SVD of one 4096x11008 matrix takes about half a minute on 2 CPU cores)::

    python benchmarks/truncated.py                 # 2 of each shape, on the CPU
    python benchmarks/truncated.py --count 3 --alpha 1.0
    python benchmarks/truncated.py --device cuda --count 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import lowrank_audit
from lowrank_audit.metrics import energy_rank

SHAPES = {"self_attn.q_proj": (4096, 4096), "mlp.up_proj": (11008, 4096)}


def decaying(rows: int, cols: int, alpha: float, noise_share: float, gen: torch.Generator) -> torch.Tensor:
    """A matrix with singular values close to ``i**-alpha`` plus Gaussian noise holding
    ``noise_share`` of the energy, scaled like a trained weight (entries about 0.02)."""
    side = min(rows, cols)
    s = torch.arange(1, side + 1, dtype=torch.float32) ** -alpha
    a = torch.randn(rows, side, generator=gen) / rows**0.5
    b = torch.randn(cols, side, generator=gen) / cols**0.5
    w = (a * s) @ b.T  # (rows, cols): spectrum near s, singular vectors random
    noise = torch.randn(rows, cols, generator=gen)
    noise *= (noise_share / (1 - noise_share) * w.square().sum() / noise.square().sum()) ** 0.5
    w += noise
    return (w * (0.02 / w.std())).half()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transfer_seconds(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Median time to copy ``nbytes`` from pinned host memory to ``device``."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        host.to(device, non_blocking=True)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2, help="matrices of each shape")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the spectrum")
    parser.add_argument("--noise-share", type=float, default=0.002, help="share of the energy in the noise floor")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; both methods run there")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama7b-shaped.safetensors"
        tensors = {
            f"model.layers.{i}.{role}.weight": decaying(*shape, args.alpha, args.noise_share, gen)
            for role, shape in SHAPES.items()
            for i in range(args.count)
        }
        save_file(tensors, path)
        size_mb = path.stat().st_size / 2**20
        print(f"{len(tensors)} fp16 matrices, {size_mb:.0f} MiB, torch threads {torch.get_num_threads()}")

        start = time.perf_counter()
        frame = lowrank_audit.spectrum(path, device=args.device, method="auto")
        auto_s = time.perf_counter() - start

        exact: dict[str, tuple[int, int, int]] = {}
        start = time.perf_counter()
        for name, t in tensors.items():
            s = torch.linalg.svdvals(t.to(device).float()).double().cpu().numpy()
            energy = float(np.sum(s**2))
            exact[name] = tuple(energy_rank(s, energy, e) for e in (0.90, 0.95, 0.99))
        exact_s = time.perf_counter() - start

    print(f"{'matrix':<32}{'method':>11}{'k':>6}{'k95 auto':>10}{'k95 exact':>10}{'k99 auto':>10}{'k99 exact':>10}")
    worst = 0.0
    for row in frame.to_dict("records"):
        e90, e95, e99 = exact[row["name"]]
        worst = max(worst, abs(row["k95"] - e95) / e95)
        print(f"{row['name']:<32}{row['method']:>11}{row['k']:>6}{row['k95']:>10}{e95:>10}{row['k99']:>10}{e99:>10}")
    print(f"auto {auto_s:.1f} s, exact svdvals loop {exact_s:.1f} s: {exact_s / auto_s:.1f}x faster")
    print(f"largest |k95 auto - k95 exact| / k95 exact: {worst:.2%}")
    if device.type == "cuda":
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        copy_s = transfer_seconds(nbytes, device)
        print(f"host-to-device copy of the same {nbytes / 2**20:.0f} MiB (pinned): {copy_s:.3f} s; "
              f"auto takes {auto_s / copy_s:.1f}x that")  # fmt: skip


if __name__ == "__main__":
    main()
