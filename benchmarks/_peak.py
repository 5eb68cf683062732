"""Peak resident memory of the current process, for the benchmark child processes."""

from __future__ import annotations

import resource


def peak_mb() -> float:
    """``VmHWM`` in MiB: it belongs to this address space. ``ru_maxrss`` survives ``execve``
    on Linux and would report the forking parent's peak when the parent was larger."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
