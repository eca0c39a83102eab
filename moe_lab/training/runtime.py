"""Process-level settings of a training process: faster CPU steps (`moe-lab train` and `moe-lab bench`) and a quiet
terminal."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings
from typing import Optional

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def retain_freed_memory() -> bool:
    """Keep freed memory in the process (glibc malloc: no mmap for large blocks, no trimming), so the next step
    reuses it instead of page-faulting fresh zero pages. PyTorch's CPU tuning guide gets the same effect by
    preloading jemalloc or tcmalloc. Measured on the MoE layer (4096 tokens, 64 experts, top-8, 2 threads): forward
    and backward 556 -> 388 ms, a dense FFN 325 -> 296 ms. Linux with glibc only; MOE_LAB_SYSTEM_MALLOC=1 turns it
    off. The cost: the process keeps its peak memory after a step."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MOE_LAB_SYSTEM_MALLOC"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _applied = ok
    return ok


def quiet_lightning() -> None:
    """Drop Lightning's advertising and known-harmless warnings from the terminal; keep everything else."""
    noise = ("💡 Tip", "TPU available", "HPU available", "`Trainer.fit` stopped", "Automatic Mixed Precision (AMP)")

    class DropNoise(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(noise)

    for name in ("lightning.pytorch", "lightning.fabric"):
        target = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in target.filters):
            target.addFilter(DropNoise())
        for handler in target.handlers:
            if not any(isinstance(f, DropNoise) for f in handler.filters):
                handler.addFilter(DropNoise())
    warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from.*")
    # moe-lab's DDP keeps broadcast_buffers=False on purpose (see moe_lab/training/strategy.py).
    warnings.filterwarnings("ignore", message=r".*`broadcast_buffers` is deprecated.*")
    # Validation sums are all-reduced by the module itself before they are logged.
    warnings.filterwarnings("ignore", message=r".*It is recommended to use `self.log\('val/.*sync_dist=True.*")


def cpu_threads(setting: Optional[int] = None, processes: int = 1) -> int:
    """Intra-op threads for a training process: `setting`, or the CPUs this process may run on (its affinity, which
    a scheduler or container may set below the machine's count) divided among the `processes` on this machine."""
    if setting:
        return setting
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    return max(1, available // max(processes, 1))
