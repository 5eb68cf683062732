"""Time ``lowrank_audit.spectrum`` against a plain per-tensor ``torch.linalg.svdvals`` loop.

Both variants read the same checkpoint and compute every matrix's exact singular values.
Each repetition runs in a fresh Python process that reports its own wall time (after
imports) and peak resident memory, so neither variant inherits the other's page cache
advantage within a process or its allocations. Run by hand::

    python benchmarks/spectrum.py                          # sample pair + a synthetic 8-layer model
    python benchmarks/spectrum.py --checkpoint PATH -n 5   # any checkpoint

The tool does more than the loop: it also hashes every input file (SHA-256), computes the
metrics and builds the report frame. Those costs are included in its time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time

sys.path.insert(0, "benchmarks")
from _peak import peak_mb
import torch
variant, path = sys.argv[1], sys.argv[2]
if variant == "tool":
    import lowrank_audit
    lowrank_audit.spectrum  # resolve the lazy import before timing
    from lowrank_audit.analyses.spectrum import spectrum
    start = time.perf_counter()
    frame = spectrum(path, device="cpu")
    count = len(frame)
else:
    from safetensors import safe_open
    start = time.perf_counter()
    count = 0
    with safe_open(path, framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            if t.is_floating_point() and t.ndim == 2 and min(t.shape) >= 2:
                s = torch.linalg.svdvals(t.float()).double().numpy()
                count += 1
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "peak_mb": peak_mb(), "matrices": count}))
"""


def synthetic_checkpoint(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> Path:
    """A LLaMA-shaped float32 checkpoint with decaying spectra (random, seeded)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        # Gaussian columns scaled by 1/sqrt(j): a spectrum that decays like trained weights'.
        decay = torch.arange(1, cols + 1, dtype=torch.float32).rsqrt()
        return torch.randn(rows, cols, generator=gen) * decay * 0.02

    tensors = {"model.embed_tokens.weight": matrix(vocab, hidden), "lm_head.weight": matrix(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}self_attn.{name}.weight"] = matrix(hidden, hidden)
        tensors[f"{p}mlp.gate_proj.weight"] = matrix(intermediate, hidden)
        tensors[f"{p}mlp.up_proj.weight"] = matrix(intermediate, hidden)
        tensors[f"{p}mlp.down_proj.weight"] = matrix(hidden, intermediate)
        tensors[f"{p}input_layernorm.weight"] = torch.ones(hidden)
    path = folder / f"synthetic-{layers}x{hidden}.safetensors"
    save_file(tensors, path)
    return path


def run(variant: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, variant, str(path)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(path: Path, repeats: int) -> None:
    size_mb = path.stat().st_size / 2**20
    runs: dict[str, list[dict]] = {"tool": [], "loop": []}
    run("tool", path), run("loop", path)  # warm-up: page cache and import caches
    for _ in range(repeats):
        for variant in runs:  # alternate, so drift in machine speed hits both alike
            runs[variant].append(run(variant, path))
    print(f"\n{path.name}: {size_mb:.1f} MiB, {runs['tool'][0]['matrices']} matrices, {repeats} runs each")
    print(f"{'variant':<8}{'median s':>10}{'min s':>9}{'max s':>9}{'peak MiB':>10}")
    for variant, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        peak = statistics.median(r["peak_mb"] for r in rs)
        print(f"{variant:<8}{statistics.median(secs):>10.3f}{min(secs):>9.3f}{max(secs):>9.3f}{peak:>10.0f}")
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(runs["tool"], runs["loop"], strict=True)]
    print(f"loop / tool time, median of paired runs: {statistics.median(ratios):.2f}x (above 1: the tool is faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a .safetensors file to benchmark instead of the defaults")
    parser.add_argument("-n", "--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    if args.checkpoint:
        compare(args.checkpoint, args.repeats)
        return
    compare(ROOT / "sample_checkpoints" / "finetuned.safetensors", args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_checkpoint(Path(tmp), args.layers, args.hidden, args.hidden * 11 // 4, 8000)
        compare(path, args.repeats)


if __name__ == "__main__":
    main()
