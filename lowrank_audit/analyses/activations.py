"""``activations``: the spectrum report of what each module sees, from dumps or moments.

Activation files (:mod:`lowrank_audit.io.activations`) -> moments per module -> a
:class:`~lowrank_audit.engine.sources.GramSource` -> the engine's Gram kernel (σ(X) from
the float64 eigenvalues of XᵀX) -> the same metrics and report as ``spectrum``, with
``kind = "activation"``, ``rows`` = N input rows and ``cols`` = d features.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_audit.analyses.spectrum import ReportRows, report_row
from lowrank_audit.distributed import current
from lowrank_audit.engine.batches import ProgressCallback
from lowrank_audit.engine.config import DEFAULT_MAX_BATCH_MB, DEFAULT_METHOD, EngineConfig
from lowrank_audit.engine.decompose import spectra
from lowrank_audit.engine.sources import GramSource
from lowrank_audit.errors import NoMatricesSelected
from lowrank_audit.io.activations import activation_layout, read_activations
from lowrank_audit.io.provenance import file_digest, provenance
from lowrank_audit.io.selection import wanted

if TYPE_CHECKING:
    import pandas as pd

# σ from the eigenvalues of XᵀX in float64 are exact to about sqrt(eps64)·σ₁: the numerical
# rank counts values above that, not above float64's own eps.
GRAM_EPS = math.sqrt(2.0**-52)


def activations(paths: Sequence[str | Path], **options: Any) -> pd.DataFrame:
    """Singular-value spectrum of each module's input rows X, one report row per module.

    Args:
        paths: Activation files: dumps (shards whose rows concatenate) or moments, in any mix.
        center: Spectrum of the centered rows X - 1μᵀ (the covariance's) instead of X's.
        include, exclude: Globs on module paths.
        device, dtype, max_batch_mb, method, seed: The engine options; activation spectra are
            always exact (float64 eigenvalues of the d x d Gram matrix), whatever ``method``.
        command: Command line recorded in the report's provenance.
        progress: Called with cumulative progress after each batch.

    Returns:
        A spectrum report frame (:data:`lowrank_audit.formats.report.COLUMNS`): ``kind`` is
        ``activation``, ``rows`` the number of rows N, ``cols`` the width d, ``nonfinite``
        the rows holding NaN or Inf (such a module is not decomposed).

    Raises:
        CheckpointError: A file is missing, unreadable or not activations (names file and module).
        NoMatricesSelected: No module is left after ``include``/``exclude``.
    """
    from lowrank_audit.formats.report import build_frame

    return build_frame(*activation_rows(paths, **options))


def activation_rows(
    paths: Sequence[str | Path],
    *,
    center: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    dtype: str = "float32",
    max_batch_mb: float = DEFAULT_MAX_BATCH_MB,
    method: str = DEFAULT_METHOD,
    seed: int = 0,
    command: str | None = None,
    progress: ProgressCallback | None = None,
) -> ReportRows:
    """:func:`activations` before its frame: the rows, sorted by module, and the provenance."""
    config = EngineConfig.create(device=device, dtype=dtype, max_batch_mb=max_batch_mb, method=method, seed=seed)
    layout = {m: size for m, size in activation_layout(paths).items() if wanted(m, include, exclude)}
    if not layout:
        raise NoMatricesSelected(f"{', '.join(map(str, paths))}: no module to audit after --include/--exclude")
    world = current()  # under torchrun: each process reads and decomposes its share of the modules
    # Work: reading N rows into the d x d Gram, then its eigenvalues.
    share = world.share(list(layout), lambda m: layout[m][0] * layout[m][1] ** 2 + layout[m][1] ** 3)

    files = [Path(p) for p in paths]
    hashed = world.share(files, lambda f: f.stat().st_size)  # each file's SHA-256 by one process

    def audit() -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        moments = read_activations(paths, modules=set(share)) if share else {}
        rows = []
        for result in spectra(GramSource(moments, center=center, path=Path(paths[0])), config, progress=progress):
            # The decomposed matrix is the d x d Gram, whose eigenvalues err by about eps·λ₁
            # whatever N is: the numerical-rank cut-off σ₁·max(N, d)·eps must not grow with N.
            rows_n, width = result.spec.matrix
            row = report_row(result, GRAM_EPS * width / max(rows_n, width, 1))
            row["nonfinite"] = moments[result.spec.name].nonfinite
            rows.append(row)
        return rows, {str(f): file_digest(f) for f in hashed}

    parts = world.gather(audit)
    rows = sorted((row for part, _ in parts for row in part), key=lambda r: r["name"])
    digests = {path: digest for _, part in parts for path, digest in part.items()}
    metadata = provenance(
        command=command or f"lowrank_audit.activations({[str(p) for p in paths]!r}, center={center})",
        inputs={"activations": [digests[str(f)] for f in files]},
        device=config.device_name,
        options={"center": center, "include": list(include), "exclude": list(exclude)},
        skipped={},
        unpaired={},
    )
    return rows, metadata


# activations() takes activation_rows()'s options, declared once there; introspection shows them.
activations.__signature__ = inspect.signature(activation_rows).replace(return_annotation="pd.DataFrame")  # type: ignore[attr-defined]


__all__ = ["GRAM_EPS", "activation_rows", "activations"]
