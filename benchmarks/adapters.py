"""Spectra of a LoRA adapter's updates from its factors (the r x r core) against the exact
SVD of each dense update, on LLaMA-7B shapes.

Writes a PEFT adapter (fp16 factors, r = 64, alpha = 128) on the seven projections of
``--layers`` LLaMA-7B layers (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008),
its factors shaped like trained ones (a decaying spectrum inside the rank), then times, in
this process:

- ``lowrank_audit.spectrum(adapter)`` (QR of B and Aᵀ, SVD of the core), and
- forming each dense update scale · B A in float32 and ``torch.linalg.svdvals`` of it,

and compares the singular values (relative to σ₁)::

    python benchmarks/adapters.py                # one layer: the dense loop takes about a minute
    python benchmarks/adapters.py --layers 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import lowrank_audit

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}  # fmt: skip
ROLES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip


def write_adapter(folder: Path, layers: int, r: int, alpha: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors, factors = {}, {}
    decay = 0.9 ** torch.arange(r, dtype=torch.float32)  # trained LoRA spectra decay inside the rank
    for layer in range(layers):
        for role, (out, inp) in SHAPES.items():
            module = f"model.layers.{layer}.{ROLES[role]}.{role}"
            b = (torch.randn(out, r, generator=gen) * decay * 0.01).half()
            a = (torch.randn(r, inp, generator=gen) * 0.01).half()
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            factors[module] = (b, a)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(SHAPES), "rank_pattern": {},
              "alpha_pattern": {}, "use_rslora": False}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    alpha = 2 * args.rank
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        factors = write_adapter(folder, args.layers, args.rank, alpha)
        lowrank_audit.spectrum(folder, device="cpu")  # warm up (imports, first calls)
        start = time.perf_counter()
        frame = lowrank_audit.spectrum(folder, device="cpu")
        cores = time.perf_counter() - start
        start = time.perf_counter()
        dense = {}
        for module, (b, a) in factors.items():
            dense[module] = torch.linalg.svdvals((alpha / args.rank) * (b.float() @ a.float())).double().numpy()
        loop = time.perf_counter() - start
    worst = 0.0
    for row in frame.to_dict("records"):
        want = dense[row["name"]][: args.rank]
        got = np.asarray(row["singular_values"][: args.rank])
        worst = max(worst, float(np.max(np.abs(got - want)) / want[0]))
    print(f"{len(factors)} modules (r = {args.rank}, LLaMA-7B shapes, fp16 factors)")
    print(f"spectrum from the factors: {cores:.3f} s;  dense float32 svdvals loop: {loop:.1f} s;  {loop / cores:.0f}x")
    print(f"largest |s - s_dense| / s1 over the top {args.rank} values: {worst:.1e}")


if __name__ == "__main__":
    main()
