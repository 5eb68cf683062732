"""Make the sample checkpoints that the tests, the README and the benchmarks use.

Besides the checkpoints: calibration data for the fine-tuned model (inputs of its nn.Linear
modules, captured with forward pre-hooks, as dumps and moments) and the dropout samples of
``dropout_net.py`` (a linear network trained with and without dropout, with activation dumps).

Run from anywhere (about 20 s on one CPU core)::

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
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lowrank_audit.io.activations import Moments, write_moments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dropout_net import DROPOUT, LinearTask, relative_error, train_linear  # noqa: E402
from tiny_llama import TinyLlamaConfig, TinyLlamaForCausalLM  # noqa: E402

SEED = 20261123
SEQ_LEN = 33
BATCH = 32
BASE_STEPS = 300
FINETUNE_STEPS = 40
SNAPSHOT_EVERY = 10  # fine-tune snapshots at steps 0, 10, 20, 30, 40 (finetune-snapshots/)
FINETUNE_BATCH = 128
SHIFTED_TOKENS = 8  # the fine-tuning task changes the successors of 8 of the 96 tokens
# Known spectrum of the synthetic rank-4 matrix: energies 64, 16, 4, 1 (total 85), so
# k90 = 2 (0.941), k95 = 3 (0.988) and k99 = 4 — three different answers.
RANK4_SINGULAR_VALUES = (8.0, 4.0, 2.0, 1.0)
RANK4_NOISE_STD = 1e-4
# The calibration data and the dropout samples (dropout_net.py) draw from their own seeds, so
# that the files made before them keep their bytes. RELU_SEED is the counterexample's, trained
# only by the tests.
CALIBRATION_SEED = SEED + 1
LINEAR_SEED = SEED + 10
RELU_SEED = SEED + 20
# Calibration data of the fine-tuned model: 8 x 32 = 256 rows per module (more rows than the
# widest input, 128), and 4 x 32 = 128 held-out rows.
CALIBRATION_SEQUENCES = 8
HELD_OUT_SEQUENCES = 4
# Files are split into shards of about this size: test_sample_files_stay_small wants every
# file under 400 kB, and a shard can overshoot by one tensor (a 128-wide module's 128 KiB).
SHARD_BYTES = 320 * 2**10


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
    snapshot: Callable[[int], None] | None = None,
) -> None:
    """``steps`` optimizer steps; ``snapshot(step)`` after each (it draws nothing from ``gen``)."""
    for step in range(1, steps + 1):
        loss = model.loss(sample_sequences(transition, batch, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if snapshot is not None:
            snapshot(step)


@torch.no_grad()
def evaluate(model: TinyLlamaForCausalLM, transition: torch.Tensor, gen: torch.Generator) -> float:
    return model.loss(sample_sequences(transition, 256, gen)).item()


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone().contiguous() for name, t in sorted(model.state_dict().items())}


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def split_into_shards(tensors: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    """Runs of the sorted names, cut where the bytes so far reach i/shards of the total."""
    names, total = sorted(tensors), nbytes(tensors)
    out: list[dict[str, torch.Tensor]] = []
    filled, current = 0, {}
    for name in names:
        current[name] = tensors[name]
        filled += tensors[name].numel() * tensors[name].element_size()
        if filled >= total * (len(out) + 1) / shards or name == names[-1]:
            out.append(current)
            current = {}
    return out


def shard_name(stem: str, shard: int, shards: int) -> str:
    return f"{stem}-{shard:05d}-of-{shards:05d}.safetensors"


def write_sharded(tensors: dict[str, torch.Tensor], folder: Path, config: dict, shards: int = 2) -> None:
    """A Hugging Face folder: ``model-0000i-of-0000n.safetensors`` plus the index."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for shard, current in enumerate(split_into_shards(tensors, shards), start=1):
        fname = shard_name("model", shard, shards)
        save_file(current, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(current, fname))
    index = {"metadata": {"total_size": nbytes(tensors)}, "weight_map": weight_map}
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


def linear_inputs(model: nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """What every ``nn.Linear`` of ``model`` receives during ``run()``, by module path
    (``model.layers.0.mlp.down_proj``), captured with forward pre-hooks, without gradients.
    Each module must be called once."""
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if name in inputs:
                raise RuntimeError(f"{name} was called twice; linear_inputs keeps one input per module")
            inputs[name] = args[0].detach().clone().contiguous()

        return hook

    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(keep(name)) for name, m in linears]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return dict(sorted(inputs.items()))


def small_shards(tensors: dict[str, torch.Tensor], stem: str) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """``(file name, tensors)`` of as many shards of about ``SHARD_BYTES`` as ``tensors`` need;
    each tensor whole in one."""
    shards = math.ceil(nbytes(tensors) / SHARD_BYTES)
    return [(shard_name(stem, i, shards), part) for i, part in enumerate(split_into_shards(tensors, shards), start=1)]


def write_calibration(model: TinyLlamaForCausalLM, task: torch.Tensor, out: Path) -> None:
    """Inputs of every nn.Linear of ``model`` on sequences of its own task: token ids, a
    calibration dump and its moments, and a held-out dump (sample_checkpoints/README.md)."""
    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    # The first 32 tokens of each sequence: the positions the model was trained on.
    calibration = sample_sequences(task, CALIBRATION_SEQUENCES, gen)[:, :-1].contiguous()  # (8, 32)
    held_out = sample_sequences(task, HELD_OUT_SEQUENCES, gen)[:, :-1].contiguous()  # (4, 32)
    folder = out / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"calibration": calibration, "heldout": held_out}, folder / "tokens.safetensors")
    # The calibration sequences as `lowrank-audit capture --inputs` takes them: named as the
    # model's forward argument, `model(ids=...)`.
    save_file({"ids": calibration}, folder / "batches.safetensors")
    dump = linear_inputs(model, lambda: model(calibration))  # module -> (8, 32, d)
    for stem, inputs in (("dump", dump), ("heldout", linear_inputs(model, lambda: model(held_out)))):
        for fname, part in small_shards(inputs, stem):
            save_file(part, folder / fname)
    moments = {}
    for name, rows in dump.items():
        moments[name] = Moments.empty(name, rows.shape[-1])
        moments[name].add(rows)
    for fname, part in small_shards({name: m.xtx for name, m in moments.items()}, "moments"):
        write_moments([moments[name] for name in part], folder / fname, force=True)


def write_dropout_samples(out: Path) -> str:
    """The linear network trained with and without dropout: weights and held-out activations."""
    task = LinearTask.make(LINEAR_SEED)
    folder = out / "dropout"
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for label, p in (("dropout", DROPOUT), ("no_dropout", 0.0)):
        model = train_linear(task, p=p)
        save_file(state_dict(model), folder / f"weights-{label}.safetensors")
        x = task.held_out()
        save_file(linear_inputs(model, lambda m=model, x=x: m(x)), folder / f"activations-{label}.safetensors")
        errors.append(f"{label} {relative_error(model, task):.2e}")
    return "linear network, held-out relative error: " + ", ".join(errors)


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
    # Snapshots of the fine-tune every SNAPSHOT_EVERY steps, for `trajectory --delta base`.
    snapshots = out / "finetune-snapshots"
    snapshots.mkdir(exist_ok=True)

    def snapshot(step: int) -> None:
        if step % SNAPSHOT_EVERY == 0:
            save_file(state_dict(model), snapshots / f"step-{step:03d}.safetensors", metadata={"format": "pt"})

    snapshot(0)
    train(model, ft_task, sgd, FINETUNE_STEPS, FINETUNE_BATCH, gen, snapshot)
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
    # Added later, each from its own generator, so that the files above keep their bytes.
    write_calibration(model, ft_task, out)
    dropout_summary = write_dropout_samples(out)

    print(f"base task loss {base_loss:.3f}; fine-tune task loss {before:.3f} -> {ft_loss:.3f}")
    print(dropout_summary)
    print(f"wrote samples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
