"""Run directories: who may write one, and the refusal to write into one that already holds a run."""

from __future__ import annotations

import os
from pathlib import Path

from moe_lab.errors import UserError

# What a run leaves behind: a directory holding any of these is used.
RUN_MARKERS = ("checkpoints", "metrics.csv", "summary.json")
# Set by the launchers that start the ranks of a run: Lightning, torchrun, SLURM (srun).
RANK_VARIABLES = ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID")


def launched_worker() -> bool:
    """True in a process that a distributed launcher started as rank > 0 of a run."""
    return any(os.environ.get(var, "0") not in ("", "0") for var in RANK_VARIABLES)


def externally_launched() -> bool:
    """True when torchrun or SLURM started every rank at once (so other ranks may be writing the run directory)."""
    return any(var in os.environ for var in ("RANK", "SLURM_PROCID"))


def refuse_used_run_dir(directory: Path, hydra_made: bool = False) -> None:
    """UserError if `directory` already holds a run (moe-lab never writes over one), or cannot be a run directory.
    With `hydra_made`, a `.hydra` folder counts too (before Hydra runs, one can only be there from another run)."""
    check_writable(directory)
    markers = (*RUN_MARKERS, ".hydra") if hydra_made else RUN_MARKERS
    used = [m for m in markers if (directory / m).exists()]
    if used:
        last = directory / "checkpoints" / "last.ckpt"
        resume = (f", or resume it with ckpt_path={last} (which writes to a new directory)" if last.is_file()
                  else "")
        raise UserError(f"{directory} already holds a run ({', '.join(used)}); moe-lab never writes over one. "
                        f"Choose a new directory with hydra.run.dir=...{resume}")


def check_writable(directory: Path, setting: str = "hydra.run.dir") -> None:
    """UserError unless `directory` is, or can be made, a writable directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file, not a directory; choose another directory with {setting}=...")
    existing = directory
    while not existing.exists():  # the deepest folder that exists: the new ones are made inside it
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot make the directory {directory}: {existing} is a file; choose another with "
                        f"{setting}=...")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {existing} (permission denied); choose a writable place with {setting}=...")


def refuse_used_sweep_dir(directory: Path) -> None:
    check_writable(directory, "hydra.sweep.dir")
    if directory.is_dir() and any(directory.iterdir()):
        raise UserError(f"the sweep directory {directory} already holds runs; moe-lab never writes over them. "
                        "Choose another with hydra.sweep.dir=...")
