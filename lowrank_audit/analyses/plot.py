"""``plot``: a picture of every report the tool writes (matplotlib, an optional extra).

Each report kind has one figure, drawn from data prepared by :func:`plot_data` (tested
against the report itself, never through pixels):

- **spectrum** (weights, updates, adapters; several reports side by side, e.g. activations
  beside weights): every matrix's normalized singular values σᵢ/σ₁ on a log scale, one colour
  per role, and a depth × role heatmap of k95 where the names carry layer indices.
- **trajectory**: σᵢ(t) of the followed matrix and the angles of its singular vectors (and
  its top-r subspace) to the start, the settling step marked.
- **compress**: the rank kept and the energy kept per tensor.
- **ranks** (recommend): the rank per layer.

Colours are the Okabe–Ito palette (distinguishable with the common colour-vision
deficiencies); figures are 3.4 in wide per panel, the width of a paper column, with 8 pt text.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from lowrank_audit.errors import CheckpointError, OptionError

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
PANEL_WIDTH = 3.4  # inches: one paper column
SUFFIXES = (".png", ".svg", ".pdf")


def _schemas() -> dict[str, Any]:
    from lowrank_audit.analyses.compress import COMPRESS_SCHEMA
    from lowrank_audit.analyses.recommend import RANKS_SCHEMA
    from lowrank_audit.analyses.trajectory import TRAJECTORY_SCHEMA
    from lowrank_audit.formats.report import SCHEMA

    return {"spectrum": SCHEMA, "trajectory": TRAJECTORY_SCHEMA, "compress": COMPRESS_SCHEMA, "ranks": RANKS_SCHEMA}


# A column only that kind of report has (trajectories also hold singular values: asked first).
_KIND_BY_COLUMN = (("subspace_angle", "trajectory"), ("treatment", "compress"), ("singular_values", "spectrum"),
                   ("params", "ranks"))  # fmt: skip


def read_any(path: str | Path) -> tuple[str, pd.DataFrame]:
    """``(kind, frame)`` of any report the tool writes, told apart by its columns.

    Raises:
        CheckpointError: Not a lowrank-audit report.
    """
    from lowrank_audit.formats.report import read_report

    path = Path(path)
    try:
        names = set(pq.read_schema(path).names)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors on a file that is not Parquet
        raise CheckpointError(f"{path}: cannot read Parquet report: {exc}") from exc
    kind = next((k for column, k in _KIND_BY_COLUMN if column in names), None)
    if kind is None:
        raise CheckpointError(f"{path}: not a lowrank-audit report (spectrum, trajectory, compress or ranks)")
    return kind, read_report(path, schema=_schemas()[kind])


@dataclass
class PlotData:
    """What a figure shows, as plain arrays: the test compares these with the report."""

    kind: str
    title: str
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # panel -> label -> y (x in xs)
    xs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # label -> colour group (role, source)
    heatmap: tuple[list[int], list[str], np.ndarray] | None = None  # layers, roles, k95
    bars: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)  # panel -> (labels, heights)
    marks: dict[str, float] = field(default_factory=dict)  # panel -> x of a vertical marker


def _selected(frame: pd.DataFrame, layers: str | None) -> pd.DataFrame:
    if layers is None:
        return frame
    chosen = frame[[fnmatchcase(str(n), layers) for n in frame["name"]]]
    if chosen.empty:
        raise OptionError(f"--layers {layers!r} matches no row of the report")
    return chosen


def _source(frame: pd.DataFrame, fallback: str) -> str:
    """What a report is of, from its provenance: ``finetuned.safetensors − base.safetensors``,
    the activation files, or a trajectory's first and last checkpoints."""
    meta = frame.attrs.get("lowrank_audit", {})
    inputs = meta.get("inputs") or meta.get("spectrum", {}).get("inputs", {})  # ranks keep their spectrum's
    if "checkpoints" in inputs:
        return f"{Path(inputs['checkpoints'][0]).name} … {Path(inputs['checkpoints'][-1]).name}"
    if "activations" in inputs:
        return "activations of " + ", ".join(Path(f["path"]).name for f in inputs["activations"])
    named = [Path(inputs[k]["path"]).name for k in ("checkpoint", "base") if isinstance(inputs.get(k), dict)]
    return " − ".join(named) or fallback


def _label(row: dict[str, Any]) -> str:
    expert = row.get("expert")
    return str(row["name"]) + ("" if expert is None or pd.isna(expert) else f"[{int(expert)}]")


def plot_data(reports: list[tuple[str, str, pd.DataFrame]], layers: str | None = None) -> PlotData:
    """The data of the figure for ``(path, kind, frame)`` reports (several only for spectra).

    Raises:
        OptionError: Reports of different kinds, several non-spectrum reports, or ``layers``
            matching nothing.
    """
    kinds = {kind for _, kind, _ in reports}
    if len(kinds) > 1 or (len(reports) > 1 and kinds != {"spectrum"}):
        raise OptionError("plot draws one report, or several spectrum reports side by side")
    kind = kinds.pop()
    names = ", ".join(_source(f, Path(p).name) for p, _, f in reports)
    if kind == "spectrum":
        return _spectrum(reports, layers, names)
    path, _, frame = reports[0]
    frame = _selected(frame, layers)
    if kind == "trajectory":
        return _trajectory(frame, names)
    data = PlotData(kind, f"{kind}: {names}")
    frame = frame[frame["rank"].notna()]  # tensors given a rank (not copied biases and norms)
    labels = [str(n) for n in frame["name"]]
    data.bars["rank"] = (labels, frame["rank"].astype("float64").to_numpy(na_value=np.nan))
    if kind == "compress":
        data.bars["energy kept"] = (labels, frame["energy_kept"].astype("float64").to_numpy(na_value=np.nan))
    return data


def _spectrum(reports: list[tuple[str, str, pd.DataFrame]], layers: str | None, names: str) -> PlotData:
    # Several reports: each panel is titled by its source, the figure only says what it shows.
    data = PlotData("spectrum", f"singular values of {names}" if len(reports) == 1 else "singular values")
    for path, _, frame in reports:
        panel = _source(frame, Path(path).name)
        frame = _selected(frame, layers)
        data.curves[panel], data.xs[panel] = {}, {}
        for row in frame.to_dict("records"):
            s = row["singular_values"]
            if s is None or len(s) == 0 or not s[0] > 0:
                continue
            s = np.asarray(s, dtype=np.float64)
            label = _label(row)
            data.curves[panel][label] = s / s[0]
            data.xs[panel][label] = np.arange(1, len(s) + 1)
            data.groups[label] = str(row["role"])
    frame = _selected(reports[0][2], layers)
    known = frame[frame["layer"].notna() & frame["expert"].isna() & frame["k95"].notna()]
    if not known.empty:
        depth = sorted(int(x) for x in known["layer"].unique())
        roles = sorted(str(r) for r in known["role"].unique())
        grid = np.full((len(depth), len(roles)), np.nan)
        for row in known.to_dict("records"):
            grid[depth.index(int(row["layer"])), roles.index(str(row["role"]))] = float(row["k95"])
        data.heatmap = (depth, roles, grid)
    return data


def _trajectory(frame: pd.DataFrame, names: str) -> PlotData:
    first = _label(frame.iloc[0].to_dict())
    rows = [r for r in frame.to_dict("records") if _label(r) == first and r["singular_values"] is not None]
    if not rows:
        raise OptionError(f"nothing to draw: {first} has no singular values in the report")
    steps = np.asarray([r["step"] if r["step"] is not None and not pd.isna(r["step"]) else r["index"] for r in rows],
                       dtype=np.float64)  # fmt: skip
    data = PlotData("trajectory", f"{first}: {names}")
    k = min(len(r["singular_values"]) for r in rows)
    data.curves["singular values"] = {
        f"σ{i + 1}": np.asarray([r["singular_values"][i] for r in rows]) for i in range(k)
    }
    data.xs["singular values"] = dict.fromkeys(data.curves["singular values"], steps)
    angles = {}
    for i in range(k):
        u = np.asarray([np.nan if r["u_angles"] is None or r["u_angles"][i] is None else r["u_angles"][i]
                        for r in rows], dtype=np.float64)  # fmt: skip
        if np.isfinite(u).any():
            angles[f"u{i + 1}"] = u
    angles["top-r subspace to last"] = np.asarray(
        [np.nan if r["subspace_angle"] is None else r["subspace_angle"] for r in rows], dtype=np.float64
    )
    data.curves["angles (degrees)"] = angles
    data.xs["angles (degrees)"] = dict.fromkeys(angles, steps)
    settled = rows[0]["settling_step"]
    if settled is not None and not pd.isna(settled):
        data.marks["angles (degrees)"] = float(settled)
        data.marks["singular values"] = float(settled)
    return data


def render(data: PlotData, out: Path, image_format: str) -> None:
    """Draw ``data`` to ``out`` as ``image_format`` (png, svg or pdf) with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 6.5, "xtick.labelsize": 7,
             "ytick.labelsize": 7}  # fmt: skip
    plt.rcParams.update(sizes | {"axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO)})
    panels = list(data.curves) + list(data.bars) + (["k95 by layer and role"] if data.heatmap else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(PANEL_WIDTH, 2.4 * len(panels)), squeeze=False)
    # Colour by group, and past the palette's eight a dashed line: nine roles stay apart.
    styles = {g: (OKABE_ITO[i % len(OKABE_ITO)], "-" if i < len(OKABE_ITO) else "--")
              for i, g in enumerate(sorted(set(data.groups.values())))}  # fmt: skip
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        if panel in data.curves:
            _curves(ax, data, panel, styles)
        elif panel in data.bars:
            labels, heights = data.bars[panel]
            ax.bar(range(len(labels)), heights, color=OKABE_ITO[0] if panel == "rank" else OKABE_ITO[2])
            ax.set_xticks(range(len(labels)), [_short(x) for x in labels], rotation=90, fontsize=5)
            ax.set_ylabel("share of ‖W‖²" if panel == "energy kept" else panel)
        else:
            depth, roles, grid = data.heatmap  # type: ignore[misc]
            image = ax.imshow(grid, aspect="auto", cmap="cividis", origin="lower")
            ax.set_xticks(range(len(roles)), roles, rotation=45, ha="right")
            ax.set_yticks(range(len(depth)), [str(d) for d in depth])
            ax.set_xlabel("role")
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, label="k95")
        spectra = data.kind == "spectrum" and panel in data.curves
        ax.set_title(("normalized spectra" if len(data.curves) == 1 else panel) if spectra else panel)
    fig.suptitle("\n".join(textwrap.wrap(data.title, 58)), fontsize=8)  # a column's width of text
    fig.tight_layout()
    fig.savefig(out, dpi=200, format=image_format)
    plt.close(fig)


def _short(label: str) -> str:
    return label if len(label) <= 28 else "…" + label[-27:]


def _curves(ax: Any, data: PlotData, panel: str, styles: dict[str, tuple[str, str]]) -> None:
    seen = set()
    for label, y in data.curves[panel].items():
        x = data.xs[panel][label]
        if data.kind == "spectrum":
            group = data.groups[label]
            colour, dash = styles[group]
            ax.plot(x, y, color=colour, ls=dash, lw=0.8, alpha=0.75, label=group if group not in seen else None)
            seen.add(group)
        else:
            ax.plot(x, y, lw=1.0, marker="o", ms=2, label=label)
    if data.kind == "spectrum":
        ax.set_yscale("log")
        ax.set_xlabel("index i")
        ax.set_ylabel("σᵢ / σ₁")
    else:
        ax.set_xlabel("training step")
        ax.set_ylabel("singular value" if panel == "singular values" else "degrees")
        if panel == "singular values":
            ax.set_yscale("log")
        if panel in data.marks:
            ax.axvline(data.marks[panel], color="#555555", ls="--", lw=0.8, label="settled")
    ax.legend(loc="best", frameon=False, ncol=2 if len(ax.get_legend_handles_labels()[0]) > 6 else 1)
    ax.grid(alpha=0.3, lw=0.4)


def plot(reports: list[str | Path], out: str | Path, *, layers: str | None = None, force: bool = False) -> Path:
    """Draw ``reports`` to ``out`` (see the module docstring); written atomically.

    Raises:
        OptionError: matplotlib is not installed, ``out`` has another suffix or exists
            without ``force``, or the reports do not go together.
        CheckpointError: A report is unreadable.
    """
    from lowrank_audit.io.outputs import atomic_file, check_target

    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise OptionError(f"--out {out}: the picture's format comes from its suffix: {', '.join(SUFFIXES)}")
    check_target(out, [Path(r) for r in reports], force=force)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OptionError("plot needs matplotlib: pip install 'lowrank-audit[plot]'") from None
    data = plot_data([(str(r), *read_any(r)) for r in reports], layers)
    if not any(data.curves.values()) and not data.bars and data.heatmap is None:
        raise OptionError("nothing to draw: no row of the report has singular values")
    with atomic_file(out, force=force) as tmp:
        render(data, tmp, out.suffix.lower().lstrip("."))
    return out


__all__ = ["OKABE_ITO", "PlotData", "plot", "plot_data", "read_any", "render"]
