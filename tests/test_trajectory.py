"""`trajectory`: singular values and vectors across checkpoints, against float64 references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lowrank_audit.analyses.trajectory import IDENTIFIABLE_GAP, checkpoint_order, trajectory
from lowrank_audit.cli import app
from tests.conftest import with_spectrum

runner = CliRunner()


def _run(folder: Path, steps=(0, 10, 20, 40), seed=0) -> list[np.ndarray]:
    """Checkpoints of one 24 x 16 matrix drifting from a matrix with distinct values; float64
    reference matrices (the stored float32 values, upcast) in step order."""
    gen = torch.Generator().manual_seed(seed)
    w = with_spectrum(24, 16, torch.linspace(4, 0.5, 16, dtype=torch.float64), seed=seed + 1)
    pull = torch.randn(24, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 16, generator=gen, dtype=torch.float64
    )
    out = []
    for step in steps:
        m = (w + 0.02 * step * pull).float()
        save_file({"layer.weight": m, "bias": torch.zeros(3)}, folder / f"step-{step}.safetensors")
        out.append(m.double().numpy())
    return out


def _svd(m):
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return u, s, vh.T


def test_rows_equal_the_float64_reference(tmp_path):
    mats = _run(tmp_path)
    frame = trajectory([str(tmp_path / "step-*.safetensors")], top_k=5)
    assert frame["step"].tolist() == [0, 10, 20, 40] and (frame["kind"] == "weight").all()
    u0, s0, v0 = _svd(mats[0])
    ul, sl, vl = _svd(mats[-1])
    r = int(np.searchsorted(np.cumsum(sl**2), 0.95 * np.sum(sl**2))) + 1
    for row, m in zip(frame.to_dict("records"), mats, strict=True):
        u, s, v = _svd(m)
        np.testing.assert_allclose(row["singular_values"], s[:5], rtol=0, atol=1e-12 * s[0])
        gap = lambda x, i: min(x[i - 1] - x[i] if i else np.inf, x[i] - x[i + 1]) > IDENTIFIABLE_GAP * x[0]  # noqa: E731
        for i in range(5):
            want = math.degrees(math.acos(min(1.0, abs(u[:, i] @ u0[:, i])))) if gap(s, i) and gap(s0, i) else None
            got = row["u_angles"][i]
            # arccos near 1 turns a rounding of 1e-16 in the cosine into 1e-6 degrees
            assert (got is None or np.isnan(got)) if want is None else got == pytest.approx(want, abs=1e-5), (
                row["step"],
                i,
            )
        angle = math.degrees(max(scipy.linalg.subspace_angles(u[:, :r], ul[:, :r]).max(),
                                 scipy.linalg.subspace_angles(v[:, :r], vl[:, :r]).max()))  # fmt: skip
        assert row["subspace_rank"] == r and row["subspace_angle"] == pytest.approx(angle, abs=1e-6)
    # settled: the first step from which the angle stays within 5° through the end, the last
    # checkpoint (0° from itself) not counting on its own
    angles = frame["subspace_angle"].tolist()
    first = next((i for i in range(len(angles) - 1) if all(a <= 5 for a in angles[i:])), None)
    want = None if first is None else frame["step"].iloc[first]
    assert frame["settling_step"].isna().all() if want is None else (frame["settling_step"] == want).all()


def test_a_flat_spectrum_has_no_individual_vectors(tmp_path):
    """Negative control: an orthogonal (scaled) initialization has every singular value equal, so
    no vector is identifiable at the start and every per-vector angle is null."""
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    for step, scale in ((0, 1.0), (5, 1.0)):
        drift = torch.zeros(12, 12, dtype=torch.float64)
        drift[0, 0] = step * 0.1
        save_file({"w.weight": (scale * q + drift).float().contiguous()}, tmp_path / f"s{step}.safetensors")
    frame = trajectory([str(tmp_path / "s0.safetensors"), str(tmp_path / "s5.safetensors")], top_k=4)
    for row in frame.to_dict("records"):
        assert all(a is None or np.isnan(a) for a in row["u_angles"]) and all(
            a is None or np.isnan(a) for a in row["v_angles"]
        )


def test_delta_modes_follow_the_updates(tmp_path):
    mats = _run(tmp_path)
    paths = [str(tmp_path / f"step-{s}.safetensors") for s in (0, 10, 20, 40)]
    base = trajectory(paths, delta="base", top_k=3)
    steps = trajectory(paths, delta="consecutive", top_k=3)
    assert (
        base["kind"].eq("delta").all() and len(base) == 4 and len(steps) == 3 and steps["step"].tolist() == [10, 20, 40]
    )
    for row, m in zip(base.to_dict("records")[1:], mats[1:], strict=True):
        want = _svd(m - mats[0])[1][:3]
        np.testing.assert_allclose(row["singular_values"], want, rtol=0, atol=1e-12 * want[0])
    for row, a, b in zip(steps.to_dict("records"), mats, mats[1:], strict=False):
        want = _svd(b - a)[1][:3]
        np.testing.assert_allclose(row["singular_values"], want, rtol=0, atol=1e-12 * want[0])


def test_glob_order_is_by_step_and_bad_inputs_are_exit_2(tmp_path):
    for step in (100, 2, 10):
        save_file({"w.weight": torch.eye(3)}, tmp_path / f"ckpt-{step}.safetensors")
    assert [s for _, s in checkpoint_order([str(tmp_path / "ckpt-*.safetensors")])] == [2, 10, 100]
    out = tmp_path / "t.parquet"
    one = runner.invoke(app, ["trajectory", str(tmp_path / "ckpt-2.safetensors"), "--out", str(out)])
    assert one.exit_code == 2 and "at least two checkpoints" in one.stderr
    save_file({"w.weight": torch.eye(4)}, tmp_path / "other.safetensors")
    shape = runner.invoke(app, ["trajectory", str(tmp_path / "ckpt-2.safetensors"), str(tmp_path / "other.safetensors"),
                                "--out", str(out)])  # fmt: skip
    assert shape.exit_code == 2 and "'w.weight' is of shape [4, 4]" in shape.stderr and not out.exists()
    ok = runner.invoke(app, ["trajectory", str(tmp_path / "ckpt-*.safetensors"), "--out", str(out)])
    assert ok.exit_code == 0 and out.exists(), ok.output
    again = runner.invoke(app, ["trajectory", str(tmp_path / "ckpt-*.safetensors"), "--out", str(out)])
    assert again.exit_code == 2 and "exists; use --force" in again.stderr


DMF = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "dmf"


def test_deep_matrix_factorization_learns_only_the_top_directions():
    """The tutorial's experiment (sample_checkpoints/make_dmf_samples.py: 3 layers, d = 30,
    target rank 3, orthogonal init scaled by 0.05, plain gradient descent), read from the tool's
    report: the first layer's top 3 values grow by a large factor while the rest stay at their
    start, the complement of the top-3 subspaces barely moves, and that subspace settles
    before the end."""
    from safetensors.torch import load_file

    frame = trajectory([str(DMF / "step-*.safetensors")], top_k=8, include=["layers.0.weight"])
    first, last = frame.iloc[0], frame.iloc[-1]
    growth = np.asarray(last["singular_values"]) / np.asarray(first["singular_values"])
    assert (growth[:3] > 5).all(), growth  # measured 20-29x
    assert np.all(np.abs(growth[3:] - 1) < 0.1), growth  # measured within 3e-4
    assert last["subspace_rank"] == 3 and first["settling_step"] < last["step"]
    # the report's values are the float64 SVD of the stored snapshots
    for row in frame.to_dict("records"):
        w = load_file(row["checkpoint"])["layers.0.weight"].double().numpy()
        np.testing.assert_allclose(row["singular_values"], np.linalg.svd(w, compute_uv=False)[:8], rtol=1e-10)
    # W1 restricted to the complement of its final top-3 input and output subspaces barely moves
    w0, wt = (load_file(frame["checkpoint"].iloc[i])["layers.0.weight"].double() for i in (0, -1))
    u, _, vh = torch.linalg.svd(wt)
    p, q = (
        torch.eye(30, dtype=torch.float64) - u[:, :3] @ u[:, :3].T,
        torch.eye(30, dtype=torch.float64) - vh[:3].T @ vh[:3],
    )
    moved = torch.linalg.norm(p @ (wt - w0) @ q) / torch.linalg.norm(p @ w0 @ q)
    assert moved < 0.01, float(moved)  # measured 2.7e-4


def test_hugging_face_checkpoint_folders_order_by_step_and_bad_regexes_are_exit_2(tmp_path):
    for step in (700, 0, 140):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file({"w.weight": torch.eye(3) * (1 + step)}, tmp_path / f"checkpoint-{step}" / "model.safetensors")
    order = checkpoint_order([str(tmp_path / "checkpoint-*" / "model.safetensors")])
    assert [s for _, s in order] == [0, 140, 700]
    out = str(tmp_path / "t.parquet")
    bad = runner.invoke(app, ["trajectory", str(tmp_path / "checkpoint-*"), "--step-regex", "s(x)?", "--out", out])
    assert bad.exit_code == 2 and "--step-regex" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
