"""Where dropout lowers the rank of a network's activations, and where it does not.

**The sample** (``make_samples.py`` writes it to ``dropout/``): a two-layer linear network
``y = fc2(fc1(x))``, 64 -> 128 -> 64, no biases, regresses onto ``y = A x`` with
``x ~ N(0, I)`` and ``A`` a 64x64 matrix with singular values ``0.85**i``. It is trained
twice from the same initialization on the same mini-batches, once with dropout 0.6 on its
hidden layer (the input of ``fc2``) and once without. This is the setting the theory
covers: for ``x ~ N(0, I)`` and inverted dropout with rate p, the expected loss is the plain
loss plus ``p / (1 - p) * sum_j ||fc2.weight[:, j]||^2 * ||fc1.weight[j]||^2``, a penalty
that acts like a nuclear-norm penalty on the product ``fc2.weight @ fc1.weight`` (Cavazza
et al., "Dropout as a low-rank regularizer for matrix factorization", AISTATS 2018; Mianjy,
Arora and Vidal, "On the implicit bias of dropout", ICML 2018): it shrinks the product's
small singular values to zero, and the hidden activations lose those directions.

**The counterexample** (:func:`train_relu`, not written to files): a ReLU MLP
classifier, 64 -> 128 -> 128 -> 10, with dropout 0.6 after each hidden ReLU. Dropout
lowers the rank of the first hidden layer's activations but raises that of the second's:
outside the linear setting there is no rule. ``sample_checkpoints/README.md`` gives the
figures; ``tests/test_dropout_samples.py`` checks both.

Every random draw comes from a local generator, so the two runs of a pair see the same
initialization, mini-batches and held-out inputs, and differ only in the dropout masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

WIDTHS = (64, 128, 64)  # input, hidden, output of the linear sample
SPECTRUM_DECAY = 0.85  # A's singular values 0.85**i: a decaying spectrum, none exactly zero
DROPOUT = 0.6  # the "high rate" of the issue
STEPS = 1000
BATCH = 256
LR = 3e-3  # Adam, cosine-annealed to 0: the end of training is quiet, so the spectra settle
# Small initialization: from PyTorch's default scale (std 1/sqrt(fan_in)) much of fc1's random
# start stays in the hidden activations (a hidden unit's fc1 row gets a gradient proportional
# to its fc2 column, which dropout drives to zero), and the effect nearly vanishes: effective
# rank 55.3 -> 49.5 and k95 44 -> 38 measured, against 43.8 -> 24.2 and 29 -> 12 from 0.01.
INIT_STD = 1e-2
HELD_OUT = 384  # rows of each activation dump: fc1 (64 wide) and fc2 (128 wide) fit in 288 KiB


class TwoLayerLinear(nn.Module):
    """``fc2(dropout(fc1(x)))``, no biases; the dropout mask comes from a caller's generator."""

    def __init__(self, widths: tuple[int, int, int] = WIDTHS, *, p: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(widths[0], widths[1], bias=False)
        self.fc2 = nn.Linear(widths[1], widths[2], bias=False)
        self.p = p

    def forward(self, x: torch.Tensor, *, masks: torch.Generator | None = None) -> torch.Tensor:
        return self.fc2(_dropout(self.fc1(x), self.p if self.training else 0.0, masks))


def _dropout(h: torch.Tensor, p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout (``F.dropout``'s scaling) with a mask drawn from ``gen``."""
    if p == 0.0:
        return h
    return h * (torch.rand(h.shape, generator=gen) >= p) / (1 - p)


@dataclass(frozen=True)
class LinearTask:
    target: torch.Tensor  # (out, in): A
    seed: int

    @classmethod
    def make(cls, seed: int) -> LinearTask:
        gen = torch.Generator().manual_seed(seed)
        d_in, _, d_out = WIDTHS
        u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
        s = SPECTRUM_DECAY ** torch.arange(min(d_in, d_out), dtype=torch.float32)
        return cls(u @ torch.diag(s) @ v.T, seed)

    def held_out(self) -> torch.Tensor:
        """The held-out inputs, shape (HELD_OUT, in); the same for every network."""
        gen = torch.Generator().manual_seed(self.seed + 3)
        return torch.randn(HELD_OUT, WIDTHS[0], generator=gen)


def _fit(model: nn.Module, steps: int, batch_loss: Callable[[], torch.Tensor]) -> None:
    """Adam at ``LR``, cosine-annealed to 0 over ``steps``; ``model`` ends in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()


def _init(model: nn.Module, gen: torch.Generator, std: Callable[[nn.Linear], float]) -> None:
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(std(layer) * torch.randn(layer.weight.shape, generator=gen))


def train_linear(task: LinearTask, *, p: float) -> TwoLayerLinear:
    """The linear sample trained with dropout rate ``p`` (0 for none), in eval mode."""
    data = torch.Generator().manual_seed(task.seed + 2)
    masks = torch.Generator().manual_seed(task.seed + 4)
    model = TwoLayerLinear(p=p)
    _init(model, torch.Generator().manual_seed(task.seed + 1), lambda _layer: INIT_STD)

    def batch_loss() -> torch.Tensor:
        x = torch.randn(BATCH, WIDTHS[0], generator=data)  # (batch, in)
        return (model(x, masks=masks) - x @ task.target.T).pow(2).sum(1).mean()

    _fit(model, STEPS, batch_loss)
    return model


@torch.no_grad()
def relative_error(model: TwoLayerLinear, task: LinearTask) -> float:
    """``||model(X) - X A^T||_F^2 / ||X A^T||_F^2`` on the held-out inputs."""
    x = task.held_out()
    want = x @ task.target.T
    return float((model(x) - want).pow(2).sum() / want.pow(2).sum())


# The counterexample: a ReLU MLP classifier, labels from a random linear teacher.
RELU_WIDTHS = (64, 128, 128, 10)
RELU_STEPS = 500
RELU_BATCH = 128
RELU_HELD_OUT = 1024


class ReluMLP(nn.Module):
    """``fc3(drop(relu(fc2(drop(relu(fc1(x)))))))``, no biases."""

    def __init__(self, *, p: float = 0.0) -> None:
        super().__init__()
        d, h1, h2, c = RELU_WIDTHS
        self.fc1 = nn.Linear(d, h1, bias=False)
        self.fc2 = nn.Linear(h1, h2, bias=False)
        self.fc3 = nn.Linear(h2, c, bias=False)
        self.p = p

    def forward(self, x: torch.Tensor, *, masks: torch.Generator | None = None) -> torch.Tensor:
        p = self.p if self.training else 0.0
        h = _dropout(F.relu(self.fc1(x)), p, masks)
        return self.fc3(_dropout(F.relu(self.fc2(h)), p, masks))


@dataclass(frozen=True)
class ReluTask:
    teacher: torch.Tensor  # (classes, in): the label of x is argmax(teacher @ x)
    seed: int

    @classmethod
    def make(cls, seed: int) -> ReluTask:
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randn(RELU_WIDTHS[-1], RELU_WIDTHS[0], generator=gen), seed)

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.teacher.T).argmax(1)

    def held_out(self) -> torch.Tensor:
        """Held-out inputs, shape (RELU_HELD_OUT, in); the same for every network."""
        return torch.randn(RELU_HELD_OUT, RELU_WIDTHS[0], generator=torch.Generator().manual_seed(self.seed + 3))


def train_relu(task: ReluTask, *, p: float) -> ReluMLP:
    """The ReLU MLP trained with dropout rate ``p`` after each hidden ReLU, in eval mode."""
    data = torch.Generator().manual_seed(task.seed + 2)
    masks = torch.Generator().manual_seed(task.seed + 4)
    model = ReluMLP(p=p)
    _init(model, torch.Generator().manual_seed(task.seed + 1), lambda layer: layer.in_features**-0.5)

    def batch_loss() -> torch.Tensor:
        x = torch.randn(RELU_BATCH, RELU_WIDTHS[0], generator=data)
        return F.cross_entropy(model(x, masks=masks), task.labels(x))

    _fit(model, RELU_STEPS, batch_loss)
    return model


@torch.no_grad()
def accuracy(model: ReluMLP, task: ReluTask) -> float:
    x = task.held_out()
    return float((model(x).argmax(1) == task.labels(x)).float().mean())


__all__ = [
    "DROPOUT", "LinearTask", "ReluMLP", "ReluTask", "TwoLayerLinear",
    "accuracy", "relative_error", "train_linear", "train_relu",
]  # fmt: skip
