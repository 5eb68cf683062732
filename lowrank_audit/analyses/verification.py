"""What ``compress`` checks after writing: the files, re-read, against the matrices they stand for.

Written factors must reproduce each matrix's truncation within what their stored dtype
allows (:data:`VERIFY_RTOL`), copied tensors must be equal, and each tensor's figures for
the compress report (energy kept, relative error, and with calibration the output error)
are measured on the written file, never on what was meant to be written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open

from lowrank_audit.analyses.calibration import Whitening, output_figures
from lowrank_audit.engine.batches import Progress, ProgressCallback
from lowrank_audit.engine.decompose import Factors
from lowrank_audit.errors import VerificationError
from lowrank_audit.formats import peft
from lowrank_audit.formats.peft import Plan, module_of
from lowrank_audit.io.checkpoint import Checkpoint, same_bits

T = TypeVar("T")


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def ticking(items: Sequence[T], progress: ProgressCallback | None) -> Iterator[T]:
    """The items, reporting the ``verify`` stage's progress after each."""
    for done, item in enumerate(items, start=1):
        yield item
        if progress is not None:
            progress(Progress(done, len(items), 0, 0, "verify"))


# Factors stored in the fine-tune's dtype must reproduce the truncated matrix to this
# relative Frobenius error; 16-bit storage rounds each factor entry by up to 2^-8.
VERIFY_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
VERIFY_RTOL_16BIT = 2e-2


def exact_update(name: str, ckpt: Checkpoint, base: Checkpoint | None) -> torch.Tensor:
    """W, or W - W_base, as precisely as the check needs: in float64 when an input is float64,
    else in float32, where the difference of two stored values is correctly rounded (each
    entry within 6e-8 of the exact update, far inside every VERIFY_RTOL but float64's).

    Every full-size buffer is made once and worked in place: each fresh one costs its page
    faults, which were most of the verification's time (benchmarks/README.md).
    """
    w = ckpt[name]
    wide = w.dtype == torch.float64 or (base is not None and base[name].dtype == torch.float64)
    work = torch.float64 if wide else torch.float32
    out = w.to(work, copy=True)
    return out.sub_(base[name].to(work)) if base is not None else out


def tensor_row(name: str, treatment: str, shape: Sequence[int], **values: Any) -> dict[str, Any]:
    matrix = len(shape) == 2
    row = {
        "name": name,
        "module": module_of(name)[0],
        "treatment": treatment,
        "rows": shape[0] if matrix else None,
        "cols": shape[1] if matrix else None,
        "rank": None,
        "params_before": math.prod(shape),
    }
    return row | values


def verify_adapter(
    plan: Plan, made: dict[str, Factors], whitened: dict[str, Whitening], ckpt: Checkpoint, base: Checkpoint,
    written: Path, progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Re-open the adapter and measure each tensor against the update it stands for."""
    rows = []
    with safe_open(str(written), "pt") as adapter:
        for name, treatment in ticking(sorted(plan.treatment.items()), progress):
            delta = exact_update(name, ckpt, base)
            energy = squared_norm(delta)
            shape = list(delta.shape)
            module = module_of(name)[0]
            if name in made:
                if treatment == "lora_embedding":
                    a_t, b_t = (adapter.get_tensor(k) for k in peft.embedding_names(module))
                    approx = product(a_t.T, b_t.T)
                else:
                    a, b = (adapter.get_tensor(k) for k in peft.lora_names(module))
                    approx = product(b, a)
                values = check_factors(f"module {module!r}", made[name], approx, delta, energy, whitened.get(name))
                rank = made[name].s.numel()
                values |= {"rank": rank, "params_after": rank * sum(shape)}
            elif treatment == "lora_bias":
                got = adapter.get_tensor(peft.lora_bias_name(module)).double()
                values = stored_values(got, delta) | {"params_after": delta.numel()}
            elif treatment == "folded_bias":
                if not same_bits(adapter.get_tensor(peft.folded_bias_name(module)), ckpt[name]):
                    raise VerificationError(f"saved bias {name!r} differs from {ckpt.path}")
                values = {"params_after": delta.numel(), "energy_kept": 1.0, "relative_error": 0.0}
            elif treatment == "modules_to_save":
                if not same_bits(adapter.get_tensor(peft.saved_name(name)), ckpt[name]):
                    raise VerificationError(f"saved tensor {name!r} differs from {ckpt.path}")
                values = {"params_after": delta.numel(), "energy_kept": 1.0, "relative_error": 0.0}
            else:  # left_out
                values = {"params_after": 0, "energy_kept": 0.0, "relative_error": 1.0 if energy > 0 else 0.0}
            rows.append(tensor_row(name, treatment, shape, **values, update_share=energy))
    return rows


def stored_values(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    norm = float(torch.linalg.vector_norm(want))
    err = float(torch.linalg.vector_norm(got - want)) / norm if norm > 0 else 0.0
    return {"energy_kept": 1.0, "relative_error": err}


def squared_norm(t: torch.Tensor) -> float:
    """||t||_F^2: row norms in t's dtype, squared and summed in float64 (as the engine sums
    them, lowrank_audit.engine.batches.squared_norms), without a float64 copy of t."""
    return float(torch.linalg.vector_norm(t, dim=-1).double().square().sum())


def product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``B @ A`` of written factors, in float32 (float64 for float64 factors): twice the speed
    of float64, and its sums err by about 1e-7 relative, far inside every VERIFY_RTOL but
    float64's."""
    work = torch.float64 if b.dtype == torch.float64 else torch.float32
    return b.to(work) @ a.to(work)


def check_factors(
    label: str, f: Factors, approx: torch.Tensor, matrix: torch.Tensor, energy: float, whitening: Whitening | None
) -> dict[str, float | bool]:
    """Written factors (``approx`` = B @ A) against the truncated matrix (must agree) and
    against the original ``matrix`` (:func:`_exact_update`, ||matrix||_F^2 = ``energy``).

    ``approx`` is overwritten: both differences are formed in place, as fresh buffers of
    this size cost more in page faults than the products themselves.

    Raises:
        VerificationError: ``approx`` is further from the truncation than the stored dtype
            allows; the message names ``label`` (the module or tensor) and the distance.
    """
    work = approx.dtype
    truncated = (f.u.to(work) * f.s.to(work)) @ f.vh.to(work)
    scale = squared_norm(truncated) ** 0.5
    drift = squared_norm(truncated.sub_(approx)) ** 0.5 / scale if scale > 0 else 0.0
    stored = _torch_dtype(f.spec.dtype)
    rtol = VERIFY_RTOL.get(stored, VERIFY_RTOL_16BIT)
    if not drift <= rtol:  # NaN fails too
        raise VerificationError(
            f"{label} reproduces its rank-{f.s.numel()} truncation only to {drift:.1e} relative (tolerance {rtol:.0e})"
        )
    err = squared_norm(approx.sub_(matrix)) ** 0.5
    relative = err / energy**0.5 if energy > 0 else 0.0
    if whitening is not None:  # approx now holds W' - W
        return {"relative_error": relative, "calibrated": True} | output_figures(approx, matrix, f.s, whitening)
    kept = float(f.s.double().square().sum()) / energy if energy > 0 else 1.0
    return {"energy_kept": min(kept, 1.0), "relative_error": relative, "calibrated": False}


__all__ = ["VERIFY_RTOL", "VERIFY_RTOL_16BIT", "check_factors", "exact_update", "product", "squared_norm",
           "stored_values", "tensor_row", "ticking", "verify_adapter"]  # fmt: skip
