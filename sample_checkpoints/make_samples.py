"""Make the sample checkpoints that the tests, the README and the benchmarks use.

Run from anywhere (about 10 s on one CPU core)::

    python sample_checkpoints/make_samples.py            # writes next to this script
    python sample_checkpoints/make_samples.py --out DIR  # or into DIR

Everything is seeded and runs on one thread, so reruns on one machine, with one torch
version, write the same bytes. Across machines only part of that holds: ATen picks its
CPU kernels at run time (AVX-512, AVX2 or scalar; ``ATEN_CPU_CAPABILITY`` overrides the
choice), they round differently in the last bits, and 340 training steps amplify those
bits to about 1e-4 of a tensor. So ``tests/test_samples.py`` pins the bytes only where no
floating-point arithmetic is involved (the file list, the JSON files, the safetensors
headers) and compares tensors, spectra and ranks within stated tolerances.

What is made and the facts tests rely on are listed in ``README.md`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_llama import TinyLlamaConfig, TinyLlamaForCausalLM  # noqa: E402

SEED = 20261123
SEQ_LEN = 33
BATCH = 32
BASE_STEPS = 300
FINETUNE_STEPS = 40
FINETUNE_BATCH = 128
SHIFTED_TOKENS = 8  # the fine-tuning task changes the successors of 8 of the 96 tokens
# Known spectrum of the synthetic rank-4 matrix: energies 64, 16, 4, 1 (total 85), so
# k90 = 2 (0.941), k95 = 3 (0.988) and k99 = 4 — three different answers.
RANK4_SINGULAR_VALUES = (8.0, 4.0, 2.0, 1.0)
RANK4_NOISE_STD = 1e-4


def markov_chain(vocab: int, successors: int, gen: torch.Generator) -> torch.Tensor:
    """A sparse row-stochastic transition matrix: each token has a few likely successors."""
    transition = torch.full((vocab, vocab), 1e-3)
    for token in range(vocab):
        nxt = torch.randperm(vocab, generator=gen)[:successors]
        transition[token, nxt] += torch.rand(successors, generator=gen) + 0.5
    return transition / transition.sum(dim=1, keepdim=True)


def shifted_chain(transition: torch.Tensor, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """The fine-tuning task: the first ``tokens`` tokens get new successors, the rest stay."""
    shifted = transition.clone()
    fresh = markov_chain(transition.shape[0], 4, gen)
    shifted[:tokens] = fresh[:tokens]
    return shifted


def sample_sequences(transition: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.empty(count, SEQ_LEN, dtype=torch.long)
    ids[:, 0] = torch.randint(transition.shape[0], (count,), generator=gen)
    for t in range(1, SEQ_LEN):
        ids[:, t] = torch.multinomial(transition[ids[:, t - 1]], 1, generator=gen).squeeze(1)
    return ids


def train(
    model: TinyLlamaForCausalLM,
    transition: torch.Tensor,
    opt: torch.optim.Optimizer,
    steps: int,
    batch: int,
    gen: torch.Generator,
) -> None:
    for _ in range(steps):
        loss = model.loss(sample_sequences(transition, batch, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def evaluate(model: TinyLlamaForCausalLM, transition: torch.Tensor, gen: torch.Generator) -> float:
    return model.loss(sample_sequences(transition, 256, gen)).item()


def state_dict(model: TinyLlamaForCausalLM) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone().contiguous() for name, t in sorted(model.state_dict().items())}


def write_sharded(tensors: dict[str, torch.Tensor], folder: Path, config: dict, shards: int = 2) -> None:
    """A Hugging Face folder: ``model-0000i-of-0000n.safetensors`` plus the index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map: dict[str, str] = {}
    shard, filled, current = 1, 0, {}
    for name in names:
        current[name] = tensors[name]
        filled += tensors[name].numel() * tensors[name].element_size()
        if filled >= total * shard / shards or name == names[-1]:
            fname = f"model-{shard:05d}-of-{shards:05d}.safetensors"
            save_file(current, folder / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(current, fname))
            shard, current = shard + 1, {}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def synthetic_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Matrices with answers known in closed form, and tensors the tool must skip."""

    def orthonormal(rows: int, cols: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
        return q

    s = torch.tensor(RANK4_SINGULAR_VALUES, dtype=torch.float64)
    exact = orthonormal(96, 4) @ torch.diag(s) @ orthonormal(64, 4).T  # (96, 64), rank 4
    noise = RANK4_NOISE_STD * torch.randn(96, 64, generator=gen, dtype=torch.float64)
    return {
        "exact_rank4.weight": exact.float(),
        "noisy_rank4.weight": (exact + noise).float(),
        "conv.weight": torch.randn(16, 8, 3, 3, generator=gen),  # audited as (16, 72)
        "experts.weight": torch.randn(4, 32, 24, generator=gen),  # audited as 4 rows of (32, 24)
        "norm.weight": torch.ones(64),  # 1-D: skipped
        "row.weight": torch.randn(1, 64, generator=gen),  # smaller side 1: skipped
        "token_ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),  # not floating: skipped
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # one thread: bit-reproducible on one machine (see the module docstring)
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)

    cfg = TinyLlamaConfig()
    base_task = markov_chain(cfg.vocab_size, 4, gen)
    model = TinyLlamaForCausalLM(cfg)
    # Pre-training: AdamW from LLaMA's initialization.
    train(model, base_task, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0), BASE_STEPS, BATCH, gen)
    base = state_dict(model)
    base_loss = evaluate(model, base_task, gen)
    # Full fine-tuning on the shifted task: every parameter trains, and nothing forces the
    # update to be low-rank; it comes out low-rank-dominated because the task shift is narrow.
    ft_task = shifted_chain(base_task, SHIFTED_TOKENS, gen)
    before = evaluate(model, ft_task, gen)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, ft_task, sgd, FINETUNE_STEPS, FINETUNE_BATCH, gen)
    finetuned = state_dict(model)
    ft_loss = evaluate(model, ft_task, gen)

    config = cfg.to_hf_dict()
    for label, tensors in (("base", base), ("finetuned", finetuned)):
        save_file(tensors, out / f"{label}.safetensors", metadata={"format": "pt"})
        write_sharded(tensors, out / f"{label}-sharded", config)
        torch.save(tensors, out / f"{label}.bin")
    save_file({k: v.bfloat16() for k, v in finetuned.items()}, out / "finetuned-bf16.safetensors")

    synthetic = synthetic_tensors(gen)
    save_file(synthetic, out / "synthetic.safetensors")
    np.savez(out / "synthetic.npz", **{k: v.numpy() for k, v in synthetic.items()})
    whole = (out / "synthetic.safetensors").read_bytes()
    (out / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])

    print(f"base task loss {base_loss:.3f}; fine-tune task loss {before:.3f} -> {ft_loss:.3f}")
    print(f"wrote samples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
