"""Energy ranks of LLaMA-7B-shaped fine-tune updates: ``--method auto`` against an exact ``svdvals`` loop.

Writes a base and fine-tune pair made the way real fine-tunes arise (``benchmarks/finetunes.py``):
per ``--layers``, the four 4096x4096 attention projections (q/k/v/o_proj) and the MLP's
up_proj (11008x4096) and down_proj (4096x11008). Each base is a float32 matrix with entries
N(0, 0.02^2); the update is ``--update-rank`` components with singular values near
``i**-alpha`` and random singular vectors, plus Gaussian noise holding ``--noise-share`` of
its energy (none by default), scaled so that storing both checkpoints in ``--dtype``
(float16 or bfloat16) adds rounding noise holding ``--floor-share`` (1.5 %) of the stored
update's energy, from the expected rounding energy ``sum(ulp(x)**2 / 12)`` of both
roundings. The audited update is ``finetuned - base`` in float32. Then, ``--repeats``
times (the two methods alternating which goes first), it times:

- the engine: ``lowrank_audit.spectrum(FT, base=BASE, method="auto")`` in this process,
  and ``lowrank-audit spectrum FT --base BASE --method auto --device D -q`` as a whole process;
- the baseline, a plain loop: every update ``ft.float() - base.float()`` passed to
  ``torch.linalg.svdvals``, energy ranks from the full spectrum
  (``lowrank_audit.metrics.energy_rank``), in this process and as a whole process
  (``python benchmarks/truncated.py --loop-only FT BASE``).

It prints the pair (shapes, sizes, the expected and measured rounding shares), a table
per matrix (method, k values computed; for each of k90, k95, k99 the tool's value, its
interval ``kNN_lo``/``kNN_hi`` when the report has those columns, '-' otherwise, the
exact value and whether it lies in the interval; ``noise_sigma``, ``signal_rank`` and
``precision_floor`` when the report has them), and a summary: the medians and the
speed-ups of auto over the loop in-process and whole-process, the largest relative
deviation of any non-null k90/k95/k99 from exact, the null ranks, and whether every
interval holds the exact rank.

``--clean`` runs the earlier benchmark instead: one fp16 checkpoint of ``--count``
4096x4096 (q_proj) and 11008x4096 (up_proj) matrices with spectra near ``i**-alpha`` plus
a Gaussian floor holding ``--noise-share`` (default there 0.2 %) of the energy, scaled
like trained weights, audited as weights. With ``--device cuda`` both methods run on the
GPU, and the script also times moving the checkpoints' bytes from pinned host memory to
the device: the floor no audit reading from the host can beat.

Run by hand. The defaults take roughly 10 minutes on 2 CPU cores, almost all of it the
exact loop (exact SVD of one 4096x11008 matrix takes about half a minute there, and the
loop runs twice a repeat); ``--scale`` shrinks every dimension and the update rank for a
quick check (0.125: by 8)::

    python benchmarks/truncated.py                            # one layer, fp16, on the CPU
    python benchmarks/truncated.py --dtype bfloat16 --noise-share 0.01
    python benchmarks/truncated.py --scale 0.125 --repeats 1  # 512x512 and 1376x512: seconds
    python benchmarks/truncated.py --clean --count 2          # the clean weights of earlier runs
    python benchmarks/truncated.py --keep /tmp/pair           # keep the pair to time the CLI by hand
    python benchmarks/truncated.py --write-only /tmp/pair
    python benchmarks/truncated.py --loop-only /tmp/pair/finetuned.safetensors /tmp/pair/base.safetensors
    python benchmarks/truncated.py --device cuda --layers 8
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from finetunes import LLAMA_7B, decaying, finetune_pair, llama_shapes, save_pair
from safetensors import safe_open
from safetensors.torch import save_file

import lowrank_audit
from lowrank_audit.metrics import energy_rank

SCRIPT = Path(__file__).resolve()
ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
CLEAN_SHAPES = {"self_attn.q_proj": (4096, 4096), "mlp.up_proj": (11008, 4096)}
TARGETS = (0.90, 0.95, 0.99)
RANKS = tuple(f"k{round(t * 100)}" for t in TARGETS)
EXTRA = ("noise_sigma", "signal_rank", "precision_floor")  # shown when the report has them


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def clean_checkpoint(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """``--count`` matrices of each clean shape: spectra near ``i**-alpha`` over the whole
    side plus a noise floor, scaled to entries of about 0.02, fp16."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for role, shape in CLEAN_SHAPES.items():
        rows, cols = (scaled(n, args.scale) for n in shape)
        for i in range(args.count):
            w = decaying(rows, cols, min(rows, cols), args.alpha, args.noise_share, gen)
            tensors[f"model.layers.{i}.{role}.weight"] = (w * (0.02 / w.std())).half()
    return tensors


def write_inputs(args: argparse.Namespace, folder: Path) -> tuple[Path, Path | None, int]:
    """Writes the pair (or with ``--clean`` the one checkpoint) and prints what it holds.
    Returns (checkpoint, base or None, bytes of all tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.clean:
        tensors = clean_checkpoint(args)
        path = folder / "weights.safetensors"
        save_file(tensors, path)
        shapes = Counter("x".join(map(str, t.shape)) for t in tensors.values())
        print(f"checkpoint (clean, audited as weights): {', '.join(f'{n} x {s}' for s, n in shapes.items())}, "
              f"float16, {path.stat().st_size / 2**20:.0f} MiB; spectra near i^-{args.alpha}, noise share "
              f"{args.noise_share:.2%}; written in {time.perf_counter() - start:.0f} s")  # fmt: skip
        return path, None, sum(t.numel() * t.element_size() for t in tensors.values())
    hidden, intermediate = (scaled(n, args.scale) for n in (LLAMA_7B["hidden"], LLAMA_7B["intermediate"]))
    update_rank = scaled(args.update_rank, args.scale)
    pair = finetune_pair(
        llama_shapes(hidden, intermediate, ROLES),
        args.layers,
        update_rank=update_rank,
        alpha=args.alpha,
        noise_share=args.noise_share,
        dtype=args.dtype,
        floor_share=args.floor_share,
    )
    base, ft = save_pair(pair, folder)
    shapes = Counter("x".join(map(str, t.shape)) for t in pair.finetuned.values())
    expected = [s["expected_share"] for s in pair.stats.values()]
    measured = [s["measured_share"] for s in pair.stats.values()]
    rms = [s["delta_rms"] for s in pair.stats.values()]
    print(f"pair: {', '.join(f'{n} x {s}' for s, n in shapes.items())} ({args.layers} layer(s)), {args.dtype}, "
          f"{ft.stat().st_size / 2**20:.0f} MiB each, written in {time.perf_counter() - start:.0f} s")  # fmt: skip
    print(f"update: rank {update_rank}, singular values near i^-{args.alpha}, noise share {args.noise_share:.2%}; "
          f"stored update RMS {min(rms):.2e}..{max(rms):.2e} (weights 0.02); rounding share of its energy: expected "
          f"{min(expected):.2%}..{max(expected):.2%}, measured {min(measured):.2%}..{max(measured):.2%}")  # fmt: skip
    return ft, base, pair.nbytes


def exact_ranks(ft: Path, base: Path | None, device: str) -> dict[str, tuple[int | None, ...]]:
    """The baseline: every 2-D floating tensor (minus its base) upcast to float32, its full
    spectrum from ``torch.linalg.svdvals``, and energy ranks from that spectrum."""
    dev = torch.device(device)
    ranks = {}
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(safe_open(str(ft), "pt"))
        b = stack.enter_context(safe_open(str(base), "pt")) if base else None
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            if t.ndim != 2 or not t.is_floating_point():
                continue
            delta = t.to(dev).float()
            if b is not None:
                delta = delta - b.get_tensor(name).to(dev).float()
            s = torch.linalg.svdvals(delta).double().cpu().numpy()
            energy = float(np.cumsum(np.square(s))[-1])  # the sum lowrank_audit.metrics takes for a full spectrum
            ranks[name] = tuple(energy_rank(s, energy, target) for target in TARGETS)
    return ranks


def run_process(cmd: list[str]) -> float:
    """Wall seconds of a whole process; exits with its output if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return seconds


def cli() -> list[str]:
    """The ``lowrank-audit`` console script of this interpreter's environment, else ``-m``."""
    exe = Path(sys.executable).with_name("lowrank-audit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lowrank_audit"]


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


def missing(v: Any) -> bool:
    import pandas as pd  # here, so that the --loop-only process imports no more than a plain loop would

    return v is None or (pd.api.types.is_scalar(v) and bool(pd.isna(v)))


def show(v: Any) -> str:
    if missing(v):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "NO"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.3g}"
    return str(v)


def inside(exact: int | None, lo: Any, hi: Any) -> bool | None:
    """Whether ``exact`` lies in [lo, hi]; None without an interval. A missing bound is open."""
    if exact is None or (missing(lo) and missing(hi)):
        return None
    return (missing(lo) or lo <= exact) and (missing(hi) or exact <= hi)


def report(frame: Any, exact: dict[str, tuple[int | None, ...]]) -> dict[str, Any]:
    """Prints the per-matrix table; returns the figures of the summary."""
    columns = set(frame.columns)
    extras = [c for c in EXTRA if c in columns]
    header = ["matrix", "method", "k"]
    for r in RANKS:
        header += [r, "lo", "hi", "exact", "in"]
    header += extras
    lines, deviations, nulls, checked, misses = [header], [], [], 0, []
    for row in frame.to_dict("records"):
        short = row["name"].removeprefix("model.layers.").removesuffix(".weight")
        line = [short, show(row["method"]), show(row["k"])]
        for r, ex in zip(RANKS, exact[row["name"]], strict=True):
            got, lo, hi = row[r], row.get(f"{r}_lo"), row.get(f"{r}_hi")
            ok = inside(ex, lo, hi)
            line += [show(got), show(lo), show(hi), show(ex), show(ok)]
            if missing(got):
                nulls.append(f"{r} of {short}")
            elif ex:
                deviations.append((abs(int(got) - ex) / ex, f"{r} of {short}: {int(got)} against {ex}"))
            elif got != ex:
                deviations.append((math.inf, f"{r} of {short}: {int(got)} against {ex}"))
            if ok is not None:
                checked += 1
                if not ok:
                    misses.append(f"{r} of {short}: {ex} not in [{show(lo)}, {show(hi)}]")
        lines.append(line + [show(row[c]) for c in extras])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(cells))
    has_intervals = all(f"{r}_{b}" in columns for r in RANKS for b in ("lo", "hi"))
    where = "kNN_lo, kNN_hi" if has_intervals else "not in this report"
    print(f"kNN: the tool's energy rank; lo, hi: its interval ({where}); exact: from the loop's full spectrum; "
          "in: exact within [lo, hi]")  # fmt: skip
    cells = len(RANKS) * len(frame)
    return {"deviations": deviations, "nulls": nulls, "cells": cells, "checked": checked, "misses": misses,
            "has_intervals": has_intervals}  # fmt: skip


def summary(times: dict[str, list[float]], figures: dict[str, Any], repeats: int) -> None:
    med = {key: statistics.median(values) for key, values in times.items()}
    print(f"median of {repeats}: auto {med['auto']:.2f} s in-process, {med['auto process']:.2f} s whole process; "
          f"exact svdvals loop {med['loop']:.2f} s in-process, {med['loop process']:.2f} s whole process")  # fmt: skip
    print(f"auto over the exact loop: {med['loop'] / med['auto']:.1f}x in-process, "
          f"{med['loop process'] / med['auto process']:.1f}x whole process")  # fmt: skip
    if figures["deviations"]:
        worst, where = max(figures["deviations"])
        count = len(figures["deviations"])
        detail = f"({where})" if worst else f"(all {count} non-null ranks equal exact)"
        print(f"largest relative deviation of a non-null rank from exact: {worst:.2%} {detail}")
    else:
        print("largest relative deviation of a non-null rank from exact: none (every rank is null)")
    nulls = figures["nulls"]
    print(f"null ranks: {len(nulls)} of {figures['cells']}" + (f" ({', '.join(nulls)})" if nulls else ""))
    if not figures["has_intervals"] and not figures["checked"]:
        print("intervals: none (the report has no kNN_lo/kNN_hi columns)")
    elif figures["misses"]:
        print(f"intervals: NOT all hold the exact rank: {len(figures['misses'])} of {figures['checked']} miss "
              f"({'; '.join(figures['misses'])})")  # fmt: skip
    else:
        unbounded = figures["cells"] - figures["checked"]
        print(f"intervals: all {figures['checked']} hold the exact rank"
              + (f" ({unbounded} ranks without an interval)" if unbounded else ""))  # fmt: skip


def measure(ft: Path, base: Path | None, args: argparse.Namespace) -> float:
    """Runs every variant ``--repeats`` times, prints the table and the summary; returns
    the median in-process time of auto."""
    spectrum = lowrank_audit.spectrum  # resolve the lazy import before timing
    tool_cmd = [*cli(), "spectrum", str(ft), *(["--base", str(base)] if base else []),
                "--method", "auto", "--device", args.device, "-q"]  # fmt: skip
    loop_cmd = [sys.executable, str(SCRIPT), "--loop-only", str(ft), *([str(base)] if base else []),
                "--device", args.device]  # fmt: skip
    times: dict[str, list[float]] = {"auto": [], "loop": [], "auto process": [], "loop process": []}
    out: dict[str, Any] = {}

    def tool() -> None:
        start = time.perf_counter()
        out["frame"] = spectrum(ft, base=base, method="auto", device=args.device)
        times["auto"].append(time.perf_counter() - start)

    def loop() -> None:
        start = time.perf_counter()
        out["exact"] = exact_ranks(ft, base, args.device)
        times["loop"].append(time.perf_counter() - start)

    def tool_process() -> None:
        times["auto process"].append(run_process(tool_cmd))

    def loop_process() -> None:
        times["loop process"].append(run_process(loop_cmd))

    for i in range(args.repeats):
        steps: list[Callable[[], None]] = [tool, loop, tool_process, loop_process]
        if i % 2:  # alternate which method goes first
            steps = [loop, tool, loop_process, tool_process]
        for step in steps:
            step()
    figures = report(out["frame"], out["exact"])
    summary(times, figures, args.repeats)
    return statistics.median(times["auto"])


def loop_only(args: argparse.Namespace) -> None:
    if len(args.loop_only) > 2:
        sys.exit("--loop-only takes FT [BASE]")
    ft, base = Path(args.loop_only[0]), Path(args.loop_only[1]) if len(args.loop_only) == 2 else None
    start = time.perf_counter()
    ranks = exact_ranks(ft, base, args.device)
    print(f"{len(ranks)} matrices, exact svdvals loop: {time.perf_counter() - start:.2f} s after imports")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="layers of LLaMA-7B's six matrices in the pair")
    parser.add_argument("--update-rank", type=int, default=256, help="components of the low-rank update")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the spectrum")
    parser.add_argument("--noise-share", type=float, help="share of the energy in Gaussian noise "
                        "(default 0 in the update; 0.002 with --clean)")  # fmt: skip
    parser.add_argument("--floor-share", type=float, default=0.015,
                        help="share of the stored update's energy in storage rounding")  # fmt: skip
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="storage dtype of the pair")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dimension (and the update rank)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (medians reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; both methods run there")
    parser.add_argument("--clean", action="store_true", help="one clean checkpoint audited as weights instead")
    parser.add_argument("--count", type=int, default=2, help="with --clean: matrices of each shape")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="write the inputs to DIR and keep them")
    parser.add_argument("--write-only", type=Path, metavar="DIR", help="only write the inputs to DIR")
    parser.add_argument("--loop-only", nargs="+", metavar="PATH", help="FT [BASE]: only run the exact loop on them")
    args = parser.parse_args()
    if args.noise_share is None:
        args.noise_share = 0.002 if args.clean else 0.0
    if not 0 < args.floor_share < 1:
        parser.error("--floor-share must lie in (0, 1)")
    if args.loop_only:
        loop_only(args)
        return
    device = torch.device(args.device)
    print(f"torch threads {torch.get_num_threads()}, device {device}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.write_only or args.keep or Path(tmp)
        ft, base, nbytes = write_inputs(args, folder)
        if args.write_only:
            return
        auto_s = measure(ft, base, args)
    if device.type == "cuda":
        copy_s = transfer_seconds(nbytes, device)
        print(f"host-to-device copy of the same {nbytes / 2**20:.0f} MiB (pinned): {copy_s:.3f} s; "
              f"auto takes {auto_s / copy_s:.1f}x that")  # fmt: skip


if __name__ == "__main__":
    main()
