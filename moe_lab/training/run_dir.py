"""Run directories: who may write one, and the refusal to write into one that already holds a run."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

from moe_lab.errors import UserError

# The file by which a process claims a run (or sweep) directory; it holds the claiming process's id and host.
CLAIM = ".moe-lab-run"
# What a run leaves behind: a directory holding any of these is used.
RUN_MARKERS = (CLAIM, "checkpoints", "metrics.csv", "summary.json")
# Inside a sweep directory: the earlier runs of jobs that did not finish, moved there when the sweep is continued
# (training/sweeps.py), as JOB-K; the job's next run resumes from the newest.
ATTEMPTS = ".attempts"
# Set by the launchers that start the ranks of a run: Lightning, torchrun, SLURM (srun).
RANK_VARIABLES = ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID")


def launched_worker() -> bool:
    """True in a process that a distributed launcher started as rank > 0 of a run."""
    return any(os.environ.get(var, "0") not in ("", "0") for var in RANK_VARIABLES)


def externally_launched() -> bool:
    """True when torchrun or SLURM started every rank at once (so other ranks may be writing the run directory)."""
    return any(var in os.environ for var in ("RANK", "SLURM_PROCID"))


def run_markers(directory: Path, hydra_made: bool = False) -> list[str]:
    """The marks of a run that `directory` holds (none: it holds no run); with `hydra_made`, a `.hydra` folder too.
    An abandoned claim (`abandoned`) and the `.hydra` beside it are no run."""
    markers = (*RUN_MARKERS, ".hydra") if hydra_made else RUN_MARKERS
    found = [m for m in markers if (Path(directory) / m).exists()]
    if CLAIM in found and abandoned(directory):
        found = [m for m in found if m not in (CLAIM, ".hydra")]
    return found


def claimant(directory: Path) -> tuple[str, str]:
    """(process id, host) of the process that claimed `directory` ('' where the claim is missing or says none)."""
    try:
        words = (Path(directory) / CLAIM).read_text().split()
    except OSError:
        return "", ""
    return (words + ["", ""])[0], (words + ["", ""])[1]


def abandoned(directory: Path) -> bool:
    """The claim on `directory` is its claimant's no more: that process (on this host) has ended (killed, so it
    could not give the directory back) without writing a checkpoint, metrics or a summary."""
    pid, host = claimant(directory)
    if not pid.isdigit() or host != socket.gethostname():
        return False  # a claim from another machine (a shared file system) cannot be checked from here
    try:
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        pass
    except PermissionError:  # alive, as another user
        return False
    return not holds_results(directory)


def holds_results(directory: Path) -> bool:
    """`directory` holds something a run wrote: a checkpoint, metrics or a summary."""
    return any((Path(directory) / m).exists() for m in RUN_MARKERS if m != CLAIM)


def refuse_used_run_dir(directory: Path, hydra_made: bool = False) -> None:
    """UserError if `directory` already holds a run (moe-lab never writes over one), or cannot be a run directory.
    With `hydra_made`, a `.hydra` folder counts too (before Hydra runs, one can only be there from another run)."""
    check_writable(directory)
    used = run_markers(directory, hydra_made)
    if used:
        last = directory / "checkpoints" / "last.ckpt"
        resume = f", or resume it with ckpt_path={last} (which writes to a new directory)" if last.exists() else ""
        raise UserError(
            f"{directory} already holds a run ({', '.join(used)}); moe-lab never writes over one. "
            f"Choose a new directory with hydra.run.dir=...{resume}"
        )


def check_writable(directory: Path, setting: str = "hydra.run.dir") -> None:
    """UserError unless `directory` is, or can be made, a writable directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file, not a directory; choose another directory with {setting}=...")
    existing = directory
    while not existing.exists():  # the deepest folder that exists: the new ones are made inside it
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"cannot make the directory {directory}: {existing} is a file; choose another with {setting}=..."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {existing} (permission denied); choose a writable place with {setting}=...")


def refuse_used_sweep_dir(directory: Path) -> None:
    check_writable(directory, "hydra.sweep.dir")
    if directory.is_dir() and any(directory.iterdir()):
        raise UserError(
            f"the sweep directory {directory} already holds runs of another command; moe-lab never "
            "writes over them (the same command again continues its sweep). Choose another with "
            "hydra.sweep.dir=..."
        )


def claimed_by_this_process(directory: Path) -> bool:
    return claimant(directory)[0] == str(os.getpid())


# The process that claimed a sweep directory, for its jobs: a launcher that runs them in processes of their own
# (hydra/launcher=parallel, slurm: submitit) hands them its environment, and a job whose sweep's claim names the
# command that started it belongs to that command.
SWEEP_OWNER_VARIABLE = "MOE_LAB_SWEEP_OWNER"


def own_sweep(directory: Path) -> None:
    """This process has claimed the sweep `directory`: the jobs it launches, in any process, belong to it."""
    if claimed_by_this_process(directory):
        os.environ[SWEEP_OWNER_VARIABLE] = str(os.getpid())


def claimed_by_this_sweep(directory: Path) -> bool:
    """The sweep `directory` is claimed by this process or by the moe-lab command that launched it."""
    owner = claimant(directory)[0]
    return owner != "" and owner in (str(os.getpid()), os.environ.get(SWEEP_OWNER_VARIABLE))


def claim_run_dir(directory: Path, hydra_made: bool = False, setting: str = "hydra.run.dir") -> None:
    """Make `directory` this process's, atomically: the exclusive create of its claim file means that of two runs
    started into one directory at once exactly one gets it, and the other a UserError, before either writes a
    thing. A directory this process already claimed (its pre-flight check did) is kept; a used one is refused."""
    directory = Path(directory)
    if claimed_by_this_process(directory):
        return
    if setting == "hydra.sweep.dir":
        refuse_used_sweep_dir(directory)
    else:
        refuse_used_run_dir(directory, hydra_made=hydra_made)
    directory.mkdir(parents=True, exist_ok=True)
    if abandoned(directory):
        take_over(directory)
    try:
        fd = os.open(directory / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise UserError(
            f"{directory} was just taken by another moe-lab run started at the same time; moe-lab never "
            f"writes two runs into one directory. Choose another with {setting}=..."
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    if setting == "hydra.sweep.dir":
        own_sweep(directory)


def release_run_dir(directory: Path) -> None:
    """Give back a directory this process claimed, for a run that ended before it wrote anything of a run (a data
    error, ranks that never met): the claim goes, and so does Hydra's copy of the config (`.hydra`), so that the
    corrected command may use the directory; its logs stay (Hydra appends)."""
    if claimed_by_this_process(directory) and not holds_results(directory):
        shutil.rmtree(Path(directory) / ".hydra", ignore_errors=True)
        (Path(directory) / CLAIM).unlink(missing_ok=True)


def take_over(directory: Path) -> None:
    """Move an abandoned claim (and the `.hydra` of its run) out of the way: renamed first, so that of two processes
    taking over at once only one moves it; the mover checks it moved the dead claim and not a new live one."""
    dead = claimant(directory)
    aside = Path(directory) / f"{CLAIM}.abandoned-{os.getpid()}"
    try:
        os.rename(Path(directory) / CLAIM, aside)
    except FileNotFoundError:
        return
    if aside.read_text().split()[:2] != list(dead):  # another process took it over first: its claim goes back
        os.rename(aside, Path(directory) / CLAIM)
        return
    aside.unlink()
    shutil.rmtree(Path(directory) / ".hydra", ignore_errors=True)


def previous_attempt(job_dir: Path) -> Optional[Path]:
    """The newest earlier attempt of the sweep job in `job_dir` (SWEEP/.attempts/N-K), if a continued sweep made one."""
    attempts = Path(job_dir).parent / ATTEMPTS
    if not attempts.is_dir():
        return None
    found = [
        p
        for p in attempts.iterdir()
        if p.name.startswith(f"{Path(job_dir).name}-") and p.name.rpartition("-")[2].isdigit()
    ]
    return max(found, key=lambda p: int(p.name.rpartition("-")[2])) if found else None


def attempt_checkpoint(attempt: Path) -> Optional[Path]:
    """The checkpoint an attempt's run was stopped with: last.ckpt, else its newest periodic checkpoint."""
    folder = attempt / "checkpoints"
    last = folder / "last.ckpt"
    if last.exists():
        return last.resolve()
    periodic = sorted(folder.glob("step*.ckpt")) if folder.is_dir() else []
    return periodic[-1] if periodic else None


def job_state(job_dir: Path) -> tuple[str, dict]:
    """(state, summary) of a sweep job's folder: finished, diverged, or stopped (interrupted, aborted, failed, killed,
    not run yet); a missing or damaged summary.json reads as {}."""
    try:
        summary = json.loads((job_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    summary = summary if isinstance(summary, dict) else {}
    status = summary.get("status")
    if status == "finished" and not (job_dir / "error.txt").exists():
        return "finished", summary
    return ("diverged" if status == "diverged" else "stopped"), summary
