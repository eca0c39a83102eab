"""Process-level settings of a training process: faster CPU steps (`moe-lab train` and `moe-lab bench`) and a quiet
terminal."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings
from typing import Optional

from moe_lab.training.run_dir import launched_worker

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
    if launched_worker():
        quiet_worker()


def quiet_worker() -> None:
    """In the ranks other than 0 of a data-parallel run: the terminal gets rank 0's warnings and information once,
    not once per process (every rank would print the same ones); each rank's log file keeps all of its own."""
    warnings.simplefilter("ignore")
    for name in ("", "lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:  # the terminal, not a log file (a FileHandler subclass)
                handler.setLevel(logging.WARNING)


# How many times an idle OpenMP thread spins before it sleeps. PyTorch's CPU builds run their intra-op threads on GNU
# libgomp, whose default is 300,000 spins (about a millisecond): on cores another job shares, a thread spinning at a
# barrier holds the core its own partner thread (descheduled) needs to reach it. Measured (the default run, 80 steps,
# 2 threads, 2-core AMD EPYC; benchmarks/2026-12-06_cpu-shared-cores/): beside a busy twin, 0.23-0.26x of its speed
# alone at the default, 0.22x at 20,000 spins, 0.49-0.52x at 1,000; alone, 1,000 spins is within the machine's
# spread of the default, where OMP_WAIT_POLICY=PASSIVE (0 spins) costs 10-15%.
OPENMP_SPIN_COUNT = 1000


def short_openmp_spin() -> bool:
    """Set GOMP_SPINCOUNT to OPENMP_SPIN_COUNT for this process and the ones it starts, unless the user set it or
    OMP_WAIT_POLICY; libgomp reads it once, when torch loads it, so this must run first (`moe-lab`'s entry point
    does). Returns whether it was set."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)
    return True


def shared_cores(cpus: Optional[int] = None, load: Optional[float] = None) -> Optional[str]:
    """The warning for a CPU run whose machine is loaded beyond its CPUs (the 1-minute load average, this run
    included, above the CPUs by more than a quarter of them or one), None otherwise: its tokens/s then fall with the
    share of the cores it gets."""
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this system
            return None
    if load <= cpus + max(1.0, cpus / 4):
        return None
    return (
        f"moe-lab: warning: the machine's load is {load:.1f} on {cpus} CPUs: this run shares its cores with other "
        f"work, and its tokens/s fall with its share of them; give each job threads= so that all of them together "
        f"use at most {cpus} (this run: threads={max(1, cpus // 2)} beside one other job of its kind)"
    )


def cpu_threads(setting: Optional[int] = None, processes: int = 1) -> int:
    """Intra-op threads for a training process: `setting`, or the CPUs this process may run on (its affinity, which
    a scheduler or container may set below the machine's count) divided among the `processes` on this machine."""
    if setting:
        return setting
    return max(1, available_cpus() // max(processes, 1))


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a scheduler or container may set below the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def oversubscription(trainer: dict) -> Optional[str]:
    """The warning for a CPU run that starts more processes on this machine than it has CPUs (None otherwise)."""
    devices = trainer.get("devices", 1)
    on_cpu = trainer.get("accelerator") == "cpu"
    cpus = available_cpus()
    if not on_cpu or not isinstance(devices, int) or devices <= cpus:
        return None
    return (
        f"moe-lab: warning: trainer.devices={devices} starts {devices} processes on {cpus} CPUs: they take turns on "
        f"the cores, so each step takes longer than in one process with the same batch (data parallelism pays with a "
        f"CPU or GPU per process); trainer.devices={cpus} or fewer uses this machine fully"
    )
