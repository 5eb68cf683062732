"""``compress --base`` at a fixed rank or an energy target, against a per-matrix ``svd`` loop.

Writes a LLaMA-shaped base and fine-tune pair in fp16 (default: 4 layers, hidden 2048, MLP
5504, no embeddings: 202M parameters per checkpoint) with ``benchmarks/finetunes.py``,
whose updates arise the way real ones do: a low-rank update with a decaying spectrum, plus
a small full-rank noise, scaled to an RMS of ``--delta-rms``, added to the stored base in
float32 and stored in fp16, so rounding adds its own noise floor. Then, in this process,
after imports:

- the baseline, mergekit's ``extract-lora`` way: for every 2-D tensor,
  ``torch.linalg.svd((ft - base).float(), full_matrices=False)``, then the top-R factors in
  fp16, saved as safetensors. One SVD serves every rank asked, so the loop's time for rank
  R is its shared time (read, subtract, SVD) plus its time to truncate and save at R;
- ``lowrank_audit.analyses.compress.compress`` for ``--rank 16``, ``--rank 128``,
  ``--rank 40`` (default method, ``auto``), ``--energy 0.995 --method randomized`` and
  ``--rank 128 --method exact``, each writing and verifying a PEFT adapter.

It prints each run's time, its speed-up over the loop at the same rank, and the largest
relative excess of the tool's reconstruction error (measured on the written fp16
adapter) over the exact truncation's error (from the loop's singular values), and for
the energy target the ranks against the exact energy ranks. Run by hand (about 3 minutes
on 2 CPU cores; the loop and the exact run are most of it)::

    python benchmarks/compress.py                       # everything, in a temporary folder
    python benchmarks/compress.py --keep /tmp/pair      # keep the pair to time the CLI by hand
    python benchmarks/compress.py --write-only /tmp/pair
    python benchmarks/compress.py --loop-only /tmp/pair --rank 16   # the baseline alone
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from finetunes import finetune_pair, llama_shapes, save_pair
from safetensors import safe_open
from safetensors.torch import save_file

PREFIX = "base_model.model."


def write_pair(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """``base.safetensors`` and ``finetuned.safetensors``, fp16, seeded: each update scaled
    to RMS ``--delta-rms`` and added to the stored base (:func:`finetunes.finetune_pair`)."""
    pair = finetune_pair(
        llama_shapes(args.hidden, args.intermediate),
        args.layers,
        update_rank=args.update_rank,
        alpha=args.alpha,
        noise_share=args.noise_share,
        delta_rms=args.delta_rms,
        from_stored_base=True,
        norms=args.hidden,
    )
    return save_pair(pair, folder)


def svd_loop(base: Path, ft: Path, ranks: list[int], out: Path) -> tuple[float, dict[int, float], dict]:
    """The baseline. Returns its shared seconds, its seconds per rank, and each matrix's
    singular values (float64) for the error references."""
    start = time.perf_counter()
    spectra: dict[str, np.ndarray] = {}
    factors: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
    per_rank = dict.fromkeys(ranks, 0.0)
    with safe_open(str(ft), "pt") as f, safe_open(str(base), "pt") as b:
        for name in sorted(f.keys()):
            w = f.get_tensor(name)
            if w.ndim != 2:
                continue
            delta = w.float() - b.get_tensor(name).float()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            spectra[name] = s.double().numpy()
            module = name.removesuffix(".weight")
            for r in ranks:
                t = time.perf_counter()
                factors[r][f"{PREFIX}{module}.lora_A.weight"] = vh[:r].to(w.dtype).contiguous()
                factors[r][f"{PREFIX}{module}.lora_B.weight"] = (u[:, :r] * s[:r]).to(w.dtype).contiguous()
                per_rank[r] += time.perf_counter() - t
    shared = time.perf_counter() - start - sum(per_rank.values())
    for r in ranks:
        t = time.perf_counter()
        (out / f"loop-{r}").mkdir(parents=True, exist_ok=True)
        save_file(factors[r], out / f"loop-{r}" / "adapter_model.safetensors")
        per_rank[r] += time.perf_counter() - t
    return shared, per_rank, spectra


def truncation_error(s: np.ndarray, rank: int) -> float:
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))


def energy_rank(s: np.ndarray, target: float) -> int:
    return int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), target)) + 1


def run_tool(base: Path, ft: Path, out: Path, spectra: dict, case: dict) -> dict:
    from lowrank_audit.analyses.compress import compress
    from lowrank_audit.ranks import RankPolicy

    policy = RankPolicy.create(**case["policy"])
    start = time.perf_counter()
    report = compress(ft, out, base=base, policy=policy, method=case["method"], device="cpu", force=True)
    seconds = time.perf_counter() - start
    lora = report[report["treatment"] == "lora"]
    excess, off = [], []
    for row in lora.to_dict("records"):
        s = spectra[row["name"]]
        excess.append(row["relative_error"] / truncation_error(s, row["rank"]) - 1)
        if "energy" in case["policy"]:
            off.append(row["rank"] - energy_rank(s, case["policy"]["energy"]))
    return {"seconds": seconds, "excess": max(excess), "ranks": sorted(set(lora["rank"])), "off": off}


CASES = [
    {"label": "--rank 16", "policy": {"rank": 16}, "method": "auto", "loop": 16},
    {"label": "--rank 128", "policy": {"rank": 128}, "method": "auto", "loop": 128},
    {"label": "--rank 40", "policy": {"rank": 40}, "method": "auto", "loop": 40},
    {"label": "--energy 0.995 --method randomized", "policy": {"energy": 0.995}, "method": "randomized"},
    {"label": "--rank 128 --method exact", "policy": {"rank": 128}, "method": "exact", "loop": 128},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--update-rank", type=int, default=256, help="components of the low-rank update")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the update's spectrum")
    parser.add_argument("--noise-share", type=float, default=0.0025, help="share of the update's energy in noise")
    parser.add_argument("--delta-rms", type=float, default=3e-4, help="RMS of the update (weights have 0.02)")
    parser.add_argument("--keep", type=Path, help="write the pair here and keep it")
    parser.add_argument("--write-only", type=Path, metavar="DIR", help="only write the pair to DIR")
    parser.add_argument("--loop-only", type=Path, metavar="DIR", help="only run the baseline on the pair in DIR")
    parser.add_argument("--rank", type=int, action="append", help="ranks for --loop-only (default 16, 40, 128)")
    parser.add_argument("--skip-exact", action="store_true", help="leave out --method exact (about 2 minutes)")
    args = parser.parse_args()
    if args.write_only:
        write_pair(args.write_only, args)
        return
    if args.loop_only:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.loop_only
            ranks = args.rank or [16, 40, 128]
            shared, per_rank, _ = svd_loop(folder / "base.safetensors", folder / "finetuned.safetensors", ranks,
                                           Path(tmp))  # fmt: skip
        print(" ".join(f"rank {r}: {shared + per_rank[r]:.1f} s" for r in ranks))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "pair"
        start = time.perf_counter()
        base, ft = write_pair(folder, args)
        params = sum(np.prod(s) for s in llama_shapes(args.hidden, args.intermediate).values()) * args.layers
        print(
            f"pair: {params / 1e6:.0f}M matrix parameters per checkpoint, fp16, {ft.stat().st_size / 2**20:.0f} MiB"
            f" each, written in {time.perf_counter() - start:.0f} s; torch threads {torch.get_num_threads()}"
        )
        shared, per_rank, spectra = svd_loop(base, ft, [16, 40, 128], Path(tmp))
        print(f"svd loop: {shared:.1f} s shared (read, subtract, SVD), then "
              + ", ".join(f"{per_rank[r]:.2f} s for rank {r}" for r in per_rank))  # fmt: skip
        header = f"{'compress':<38}{'tool':>8}{'loop':>8}{'speed-up':>10}{'error vs exact':>16}  ranks"
        print(header)
        for case in CASES:
            if case["method"] == "exact" and args.skip_exact:
                continue
            got = run_tool(base, ft, Path(tmp) / "out", spectra, case)
            loop = shared + per_rank[case["loop"]] if "loop" in case else None
            speed = f"{loop / got['seconds']:.1f}x" if loop else "—"
            ranks = f"{got['ranks'][0]}..{got['ranks'][-1]}" if len(got["ranks"]) > 1 else str(got["ranks"][0])
            if got["off"]:
                ranks += f" (exact rank {min(got['off']):+d}..{max(got['off']):+d})"
            print(f"{case['label']:<38}{got['seconds']:>7.1f}s{(f'{loop:.1f}s' if loop else '—'):>8}{speed:>10}"
                  f"{got['excess']:>+15.3%}  {ranks}")  # fmt: skip


if __name__ == "__main__":
    main()
