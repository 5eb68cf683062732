"""Activation-aware truncation (SVD-LLM, Wang et al. 2024, arXiv 2403.07378).

A layer y = W x sees input rows X (N x d). Truncating W itself minimizes ||W - W'||_F, but
what matters is the layer's output error ||(W - W')Xᵀ||_F = ||(W - W')S||_F, where S is the
lower Cholesky factor of XᵀX = S Sᵀ. So the engine decomposes W S (a
:class:`WhitenedSource`), keeps its top r triplets U Σ Vᵀ, and un-whitens:
W' = U Σ (Vᵀ S⁻¹), the best rank-r W' for the calibration outputs. The same holds for an
update ΔW, whose layer sees the same inputs.

XᵀX of real models is often singular or ill-conditioned: it is damped by λ·mean(diag XᵀX)·I,
λ starting at :data:`DAMPING_START` and growing tenfold until the Cholesky factorization
succeeds (at most :data:`DAMPING_MAX`); the λ used is reported per module. Nothing falls
back silently: a module whose Gram cannot be factored even then is an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lowrank_audit.engine.decompose import Factors
from lowrank_audit.engine.sources import MatrixSource
from lowrank_audit.errors import CheckpointError, OptionError
from lowrank_audit.io.activations import Moments, activation_layout, read_activations
from lowrank_audit.io.selection import MatrixSpec

# Damping λ, as a fraction of mean(diag XᵀX): 1e-6 leaves a well-conditioned Gram's whitened
# spectrum unchanged to about 1e-6 relative, and each tenfold step trades fidelity for a
# factorization that exists; past 1 the "whitening" is mostly the identity, so it stops there.
DAMPING_START = 1e-6
DAMPING_MAX = 1.0


@dataclass(frozen=True)
class Whitening:
    """S with S Sᵀ = XᵀX + λ·mean(diag XᵀX)·I for one module's calibration rows."""

    module: str
    factor: torch.Tensor  # (d, d) lower triangular, float64
    damping: float  # λ


def whitening(moments: Moments, where: str) -> Whitening:
    """The damped Cholesky factor of a module's XᵀX.

    Raises:
        CheckpointError: The rows hold NaN/Inf, there are none, or even ``DAMPING_MAX`` does
            not make XᵀX positive definite; the message names ``where`` and the module.
    """
    if moments.nonfinite:
        raise CheckpointError(
            f"{where}: module {moments.module!r} has {moments.nonfinite} activation rows with NaN/Inf; "
            "compress cannot calibrate on them"
        )
    gram = moments.xtx
    scale = float(gram.diagonal().mean()) if moments.count else 0.0
    if not scale > 0:
        raise CheckpointError(f"{where}: module {moments.module!r} has no nonzero activation rows to calibrate on")
    damping = DAMPING_START
    eye = torch.eye(moments.width, dtype=torch.float64)
    while damping <= DAMPING_MAX:
        factor, info = torch.linalg.cholesky_ex(gram + damping * scale * eye)
        if int(info) == 0:
            return Whitening(moments.module, factor, damping)
        damping *= 10
    raise CheckpointError(
        f"{where}: module {moments.module!r}: XᵀX is not positive definite even with damping {DAMPING_MAX:g}"
    )


def calibration_plan(
    paths: Sequence[str | Path], specs: Sequence[MatrixSpec], target: Path, *,
    needed: Sequence[MatrixSpec] | None = None,
) -> dict[str, Whitening]:  # fmt: skip
    """Whitening for every matrix whose module has calibration rows, by tensor name.

    Every matrix is checked against the files' headers; only the ``needed`` ones (a
    process's share under torchrun; all when None) have their rows read and factored.

    Raises:
        CheckpointError: Unreadable or non-finite activations, or a module whose activation
            width is not the matrix's input width (names the file and module).
        OptionError: No calibrated module is among the matrices to compress.
    """
    if not paths:
        return {}
    where = ", ".join(str(p) for p in paths)
    layout = activation_layout(paths)
    calibrated = [spec for spec in specs if spec.module in layout]
    for spec in calibrated:
        width = layout[spec.module][1]
        if width != spec.cols:
            raise CheckpointError(
                f"{where}: module {spec.module!r} has activations of width {width} but {spec.name!r} "
                f"takes inputs of width {spec.cols}"
            )
    if not calibrated:
        example = next(iter(layout), "none")
        raise OptionError(
            f"--calibration {where}: no module in common with the matrices of {target} "
            f"(calibration has {example!r}, the checkpoint {specs[0].module if specs else 'none'!r})"
        )
    names = {spec.name for spec in (specs if needed is None else needed)}
    mine = [spec for spec in calibrated if spec.name in names]
    moments = read_activations(paths, modules={spec.module for spec in mine}) if mine else {}
    return {spec.name: whitening(moments[spec.module], where) for spec in mine}


class WhitenedSource:
    """The matrices of ``inner``, each times its module's S where there is one: W S (or ΔW S)."""

    def __init__(self, inner: MatrixSource, whitened: Mapping[str, Whitening]) -> None:
        self.inner, self.whitened = inner, dict(whitened)
        self.specs, self.path, self.gram, self.extras = inner.specs, inner.path, False, inner.extras

    def read(self, spec: MatrixSpec, out: torch.Tensor) -> list[float]:
        floors = self.inner.read(spec, out)
        if spec.name in self.whitened:
            out[0].copy_(out[0].double() @ self.whitened[spec.name].factor)
            floors = [0.0]  # the floor of W S is not the floor of W; not modelled
        return floors

    def stored_bytes(self, spec: MatrixSpec) -> int:
        return self.inner.stored_bytes(spec)

    def release(self) -> None:
        self.inner.release()


def unwhitened(found: Iterator[Factors], whitened: Mapping[str, Whitening]) -> Iterator[Factors]:
    """Factors of W S turned into factors of W' = U Σ (Vᵀ S⁻¹); others pass unchanged."""
    for f in found:
        w = whitened.get(f.spec.name)
        if w is None:
            yield f
            continue
        # Vᵀ S⁻¹ solves Y S = Vᵀ: a triangular solve in float64, never an explicit inverse.
        vh = torch.linalg.solve_triangular(w.factor, f.vh.double(), upper=False, left=False)
        yield replace(f, vh=vh.to(f.vh.dtype))


def output_figures(error: torch.Tensor, matrix: torch.Tensor, s: torch.Tensor, w: Whitening) -> dict[str, float]:
    """The calibration-weighted figures of one written matrix.

    Args:
        error: W' - W (or the update's), shape (m, n).
        matrix: W, shape (m, n).
        s: The kept singular values of W S.
        w: The module's whitening.

    Returns:
        ``output_error`` ||(W - W')S||_F / ||W S||_F and ``energy_kept`` Σs² / ||W S||_F²
        (the share of the calibration outputs' energy), with the ``damping`` used.
    """
    factor = w.factor.to(error.dtype)
    scale = float(torch.linalg.matrix_norm(matrix @ factor).double())
    err = float(torch.linalg.matrix_norm(error @ factor).double())
    kept = float(s.double().square().sum()) / scale**2 if scale > 0 else 1.0
    return {"output_error": err / scale if scale > 0 else 0.0, "energy_kept": min(kept, 1.0), "damping": w.damping}


__all__ = ["DAMPING_MAX", "DAMPING_START", "WhitenedSource", "Whitening", "calibration_plan", "output_figures",
           "unwhitened", "whitening"]  # fmt: skip
