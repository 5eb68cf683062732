"""How the engine runs, declared once: method, precision, batch memory, rank cap, seed, device.

Every command builds one :class:`EngineConfig` through :meth:`EngineConfig.create`, which
validates the options as a user spells them; the engine never reads options elsewhere.
torch is imported only when a configuration is built, so the CLI's option declarations
can take their defaults from here and ``--help`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowrank_audit.errors import OptionError

if TYPE_CHECKING:
    import torch

    from lowrank_audit.io.selection import MatrixSpec

DTYPES = ("float32", "float64")
METHODS = ("auto", "exact", "randomized")
DEFAULT_METHOD = "auto"
DEFAULT_MAX_BATCH_MB = 256.0
# auto: below this smaller side an exact decomposition takes under a second on 2 CPU
# cores (1024 x 1024: about 0.4 s), so truncation is not worth its nulls.
AUTO_EXACT_SIDE = 1024


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. Build with :meth:`create` to validate user input once."""

    device: torch.device
    dtype: torch.dtype
    max_batch_bytes: int
    method: str = DEFAULT_METHOD
    rank_cap: int | None = None
    seed: int = 0

    @classmethod
    def create(
        cls,
        *,
        device: str = "auto",
        dtype: str = "float32",
        max_batch_mb: float = DEFAULT_MAX_BATCH_MB,
        method: str = DEFAULT_METHOD,
        rank_cap: int | None = None,
        seed: int = 0,
    ) -> EngineConfig:
        """Validate options as a user spells them.

        Raises:
            OptionError: Unknown dtype or method, a CUDA device that is not present, a
                non-positive batch budget or rank cap, or a rank cap with ``exact``.
        """
        import torch

        if dtype not in DTYPES:
            raise OptionError(f"dtype must be one of {', '.join(DTYPES)} but got {dtype!r}")
        if method not in METHODS:
            raise OptionError(f"method must be one of {', '.join(METHODS)} but got {method!r}")
        if not max_batch_mb > 0:
            raise OptionError(f"max-batch-mb must be positive but got {max_batch_mb}")
        if rank_cap is not None and rank_cap < 1:
            raise OptionError(f"rank-cap must be a positive integer but got {rank_cap}")
        if rank_cap is not None and method == "exact":
            raise OptionError("rank-cap limits the randomized method; use --method auto or randomized with it")
        dev = resolve_device(device)
        budget = int(max_batch_mb * 2**20)
        if dev.type == "cuda":
            # Batched SVD/QR workspaces on the device come to a few times the batch; a
            # quarter of what is free leaves room for them (not yet measured on a GPU).
            budget = min(budget, torch.cuda.mem_get_info(dev)[0] // 4)
        return cls(dev, getattr(torch, dtype), budget, method, rank_cap, seed)

    @property
    def eps(self) -> float:
        import torch

        return float(torch.finfo(self.dtype).eps)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def exact_for(self, side: int) -> bool:
        """Whether matrices whose smaller side is ``side`` are decomposed exactly."""
        return self.method == "exact" or (self.method == "auto" and side <= AUTO_EXACT_SIDE)

    def cost(self, spec: MatrixSpec) -> int:
        """Relative work of decomposing ``spec``'s matrices, to balance processes: m·n·min(m, n)
        when exact, m·n·k when truncated (k: the first sketch, or the rank cap)."""
        from lowrank_audit.engine.randomized import BLOCK

        side = min(spec.rows, spec.cols)
        k = side if self.exact_for(side) and self.rank_cap is None else min(side, self.rank_cap or BLOCK)
        return spec.count * spec.rows * spec.cols * k

    @property
    def device_name(self) -> str:
        """The device as reports record it: ``cpu``, or ``cuda:0 (NVIDIA H200)``."""
        if self.device.type == "cuda":
            import torch

            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when present, else the CPU. Under a launcher
    (torchrun), ``auto`` and ``cuda`` are the GPU of this process's local rank.

    Raises:
        OptionError: The name is not a device, or names a CUDA device that is absent.
    """
    import torch

    from lowrank_audit.distributed import local_rank

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local_rank() is not None:
        # One GPU visible (CUDA_VISIBLE_DEVICES per process, Slurm --gpus-per-task=1): it is this process's.
        device = f"cuda:{local_rank() if torch.cuda.device_count() > 1 else 0}"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise OptionError(f"device must be auto, cpu or cuda[:N] but got {device!r}") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise OptionError(
                f"device {device!r} is not available: this machine has {count} CUDA device(s); use --device cpu"
            )
    elif dev.type != "cpu":
        raise OptionError(f"device must be auto, cpu or cuda[:N] but got {device!r}")
    return dev


__all__ = ["AUTO_EXACT_SIDE", "DEFAULT_MAX_BATCH_MB", "DEFAULT_METHOD", "DTYPES", "METHODS", "EngineConfig",
           "resolve_device"]  # fmt: skip
