"""Make the deep-matrix-factorization samples in ``dmf/``: training snapshots of a 3-layer
linear network W3 W2 W1 fitted to a rank-3 matrix from a small orthogonal start, where
gradient descent learns the target's singular values one after another (incremental
learning) and leaves the rest of each layer where it began.

Run from anywhere (about a second on one CPU core)::

    python sample_checkpoints/make_dmf_samples.py            # writes sample_checkpoints/dmf/
    python sample_checkpoints/make_dmf_samples.py --out DIR  # or into DIR

- Target: M* = U diag(3, 2, 1) V^T, 30 x 30, with U, V (30 x 3) orthonormal columns from a
  float64 QR of seeded Gaussians.
- Model: W = W3 W2 W1, each Wi 30 x 30, started at Wi = EPS * Qi with Qi a seeded random
  orthogonal matrix (so the layers start balanced: Wi+1^T Wi+1 = Wi Wi^T = EPS^2 I).
- Loss: 1/2 ||W3 W2 W1 - M*||_F^2, every entry observed (no matrix completion).
- Plain gradient descent in float64: fixed learning rate, no momentum, no weight decay.

Writes ``step-<step:06d>.safetensors`` at each of ``SNAPSHOT_STEPS`` (float32
``layers.0.weight`` = W1, ``layers.1.weight`` = W2, ``layers.2.weight`` = W3) and
``training.json``: the settings, the loss at each snapshot, the top singular values of each
layer and of the product, and for W1 the growth of its top singular values, how little its
complement moves and how its top-3 left singular subspace settles. All figures are
computed in float64 from the stored float32 tensors, except the losses, which are those of
the float64 training state (``loss_stored`` gives the loss of the stored tensors).

Seeded, one thread: reruns on one machine write the same bytes. ``README.md`` beside this
file gives the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
SEED = 20261123 + 40  # make_samples.py uses SEED + 0, 1, 10, 20; make_lora_samples.py SEED + 30 ...
SIZE = 30
DEPTH = 3
TARGET_SINGULAR_VALUES = (3.0, 2.0, 1.0)
EPS = 0.05
LR = 0.05
STEPS = 700
# Chosen by hand on this run: the start; sigma_1 of the product rising (steps 140-170: 0.03 at 140,
# 2.06 at 160) and learned (200); sigma_2 mid-rise (0.50 at 260) and learned (400, sigma_3 still
# 0.006); sigma_3 rising (0.18 at 480, 0.64 at 500) and learned (540); the end, with the loss at
# the floor that the unlearned rest of the small start leaves (27 singular values EPS^3 each).
SNAPSHOT_STEPS = (0, 140, 160, 200, 260, 400, 480, 500, 540, 700)
TOP = 5  # singular values recorded per layer and snapshot
TARGET_RANK = len(TARGET_SINGULAR_VALUES)


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal columns from a float64 QR of a Gaussian, signs fixed so R has a positive diagonal."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def product(layers: list[torch.Tensor]) -> torch.Tensor:
    """W = W3 W2 W1 for layers [W1, W2, W3]."""
    result = layers[0]
    for layer in layers[1:]:
        result = layer @ result
    return result


def loss_of(layers: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (product(layers) - target).square().sum()


def largest_principal_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest principal angle between the column spans of orthonormal a and b, in degrees."""
    cosines = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    # The smallest cosine gives the largest angle; asin of the sine is accurate near 0.
    sine = math.sqrt(max(0.0, 1.0 - float(cosines.min()) ** 2))
    return math.degrees(math.asin(min(1.0, sine)))


def train(generator: torch.Generator) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]], dict[int, float]]:
    u = orthonormal(SIZE, TARGET_RANK, generator)
    v = orthonormal(SIZE, TARGET_RANK, generator)
    target = u @ torch.diag(torch.tensor(TARGET_SINGULAR_VALUES, dtype=torch.float64)) @ v.T
    layers = [(EPS * orthonormal(SIZE, SIZE, generator)).requires_grad_() for _ in range(DEPTH)]
    snapshots: dict[int, list[torch.Tensor]] = {}
    losses: dict[int, float] = {}
    for step in range(STEPS + 1):
        loss = loss_of(layers, target)
        if step in SNAPSHOT_STEPS:
            snapshots[step] = [layer.detach().clone() for layer in layers]
        if step in SNAPSHOT_STEPS or step == STEPS - 1:
            losses[step] = float(loss.detach())
        if step == STEPS:
            break
        grads = torch.autograd.grad(loss, layers)
        with torch.no_grad():
            for layer, grad in zip(layers, grads, strict=True):
                layer -= LR * grad
    return target, snapshots, losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=HERE / "dmf", help="folder to write (default: dmf/ beside this file)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()

    target, snapshots, losses = train(torch.Generator().manual_seed(SEED))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stored: dict[int, list[torch.Tensor]] = {}
    for step in SNAPSHOT_STEPS:
        tensors = {
            f"layers.{i}.weight": layer.to(torch.float32).contiguous() for i, layer in enumerate(snapshots[step])
        }
        save_file(tensors, out / f"step-{step:06d}.safetensors", metadata={"format": "pt"})
        # Every figure below comes from the float32 tensors as stored, in float64.
        stored[step] = [tensors[f"layers.{i}.weight"].to(torch.float64) for i in range(DEPTH)]

    first, last = SNAPSHOT_STEPS[0], SNAPSHOT_STEPS[-1]
    w1_init, w1_final = stored[first][0], stored[last][0]
    u_final, s_final, vh_final = torch.linalg.svd(w1_final)
    s_init = torch.linalg.svdvals(w1_init)
    u3, v3 = u_final[:, :TARGET_RANK], vh_final[:TARGET_RANK].T
    eye = torch.eye(SIZE, dtype=torch.float64)
    left, right = eye - u3 @ u3.T, eye - v3 @ v3.T
    complement_change = float(torch.linalg.norm(left @ (w1_final - w1_init) @ right))
    complement_init = float(torch.linalg.norm(left @ w1_init @ right))

    record = {
        "description": (
            "3-layer deep matrix factorization W3 W2 W1 (each 30 x 30) fitted by plain full-batch gradient "
            "descent in float64 to a rank-3 30 x 30 target, every entry observed; layers.0.weight = W1, "
            "layers.1.weight = W2, layers.2.weight = W3 (stored float32). Singular values and subspace figures "
            "are float64 figures of the stored float32 tensors."
        ),
        "seed": SEED,
        "size": SIZE,
        "depth": DEPTH,
        "target": "U diag(target_singular_values) V^T, U and V 30 x 3 orthonormal (seeded float64 QR)",
        "target_singular_values": list(TARGET_SINGULAR_VALUES),
        "init": "W_i = eps * Q_i, Q_i seeded random orthogonal 30 x 30 (float64 QR of a Gaussian)",
        "eps": EPS,
        "loss": "1/2 ||W3 W2 W1 - M*||_F^2, full observation",
        "optimizer": "plain gradient descent, fixed lr, no momentum, no weight decay",
        "lr": LR,
        "steps": STEPS,
        "snapshot_steps": list(SNAPSHOT_STEPS),
        "files": [f"step-{step:06d}.safetensors" for step in SNAPSHOT_STEPS],
        "loss_at_snapshots": [losses[step] for step in SNAPSHOT_STEPS],
        "relative_loss_at_snapshots": [losses[step] / losses[first] for step in SNAPSHOT_STEPS],
        "loss_relative_decrease_last_step": (losses[STEPS - 1] - losses[STEPS]) / losses[STEPS],
        "loss_floor_note": (
            "the final loss is what the unlearned rest of the start leaves: the product's part outside the "
            "target's singular subspaces, about eps^6 * 27^2 / 30 / 2"
        ),
        "loss_stored_at_snapshots": [float(loss_of(stored[step], target)) for step in SNAPSHOT_STEPS],
        "top_singular_values": {
            f"layers.{i}.weight": [torch.linalg.svdvals(stored[step][i])[:TOP].tolist() for step in SNAPSHOT_STEPS]
            for i in range(DEPTH)
        },
        "top_singular_values_of_product": [
            torch.linalg.svdvals(product(stored[step]))[:TOP].tolist() for step in SNAPSHOT_STEPS
        ],
        "layer0": {
            "sigma_ratio_final_over_init": (s_final[:TOP] / s_init[:TOP]).tolist(),
            "complement_relative_change": complement_change / complement_init,
            "complement_relative_change_definition": (
                "||(I - U3 U3^T)(W1(T) - W1(0))(I - V3 V3^T)||_F / ||(I - U3 U3^T) W1(0) (I - V3 V3^T)||_F, "
                "U3, V3 the top-3 left and right singular vectors of W1(T), T the final step"
            ),
            "top3_left_subspace_angle_to_final_deg": [
                largest_principal_angle_deg(torch.linalg.svd(stored[step][0])[0][:, :TARGET_RANK], u3)
                for step in SNAPSHOT_STEPS
            ],
            "top3_left_subspace_angle_definition": (
                "largest principal angle, in degrees, between the top-3 left singular subspace of W1(t) and of W1(T)"
            ),
        },
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(SNAPSHOT_STEPS)} snapshots and training.json to {out} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
