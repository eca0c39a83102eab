"""A sweep's jobs, from its folder: which were planned, which finished, and continuing one that was stopped.

Hydra's basic sweeper runs the cartesian product of the swept values, in the order of the overrides (those of
`hydra.sweeper.params` first, then the command line's, a key given twice keeping its first place); `planned_jobs`
rebuilds that list from the sweep's `multirun.yaml` with Hydra's public override parser, so the summary can list the
jobs that never started. Running the same `moe-lab train -m ...` again on the same sweep directory continues the
sweep (`continue_sweep`): finished jobs are skipped, each job that did not finish moves, as one rename, to
`SWEEP/.attempts/N-K` (nothing is deleted), and its next run resumes from that attempt's last checkpoint
(training/train.py), or starts again where it had none. A job that submitit requeued after a pre-emption sets its
own stopped run aside the same way (`set_aside_requeued`). Reading multirun.yaml only compares and counts: nothing in
it is applied.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from moe_lab.errors import Diverged, UserError
from moe_lab.files import process_alive
from moe_lab.training.run_dir import (
    ATTEMPTS,
    CLAIM,
    attempt_checkpoint,
    claimed_by_this_sweep,
    job_state,
    launched_worker,
    own_sweep,
    previous_attempt,
    run_markers,
)

if TYPE_CHECKING:
    from moe_lab.training.schemas import TrainConfig

# The most jobs a sweep folder's plan may list: what a multirun.yaml asks for is counted before anything is expanded
# (a `range(0,1000000000)` would otherwise build a billion-element list), and a plan over this is refused.
MAX_PLANNED_JOBS = 100_000


def _multirun(sweep_dir: Path) -> Optional[dict]:
    """The sweep's multirun.yaml, read as data; None when there is none; UserError when it is damaged."""
    file = Path(sweep_dir) / "multirun.yaml"
    if not file.exists():
        return None
    try:
        loaded = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(
            f"{file} is damaged ({type(e).__name__}); restore it, or choose another sweep directory"
        ) from None
    if not isinstance(loaded, dict):
        raise UserError(f"{file} is damaged (not a mapping); restore it, or choose another sweep directory")
    return loaded


def _task_overrides(multirun: dict) -> Optional[list[str]]:
    task = ((multirun.get("hydra") or {}).get("overrides") or {}).get("task")
    return [str(o) for o in task] if isinstance(task, list) else None


def planned_jobs(sweep_dir: Path) -> Optional[list[list[str]]]:
    """Every job's overrides, in Hydra's job order (Hydra's job number N; its folder is SWEEP/N unless
    hydra.sweep.subdir names it otherwise), or None when the sweep's plan is not known in advance (another sweeper
    than Hydra's basic one, e.g. Optuna; no readable multirun.yaml)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    multirun = _multirun(sweep_dir)
    task = _task_overrides(multirun) if multirun else None
    sweeper = _sweeper(multirun) if multirun else {}
    if task is None or not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = sweeper.get("params")
    params = params if isinstance(params, dict) else {}
    try:
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + task)
    except HydraException:
        return None
    keys = [o.get_key_element() for o in parsed]
    counts = [_count_values(o) for o in parsed]
    known = [count for count in counts if count is not None]
    if len(known) != len(counts):
        return None  # a glob over a group's options (listed by Hydra's config loader) or an interval
    if math.prod(known) > MAX_PLANNED_JOBS:
        raise UserError(
            f"{Path(sweep_dir) / 'multirun.yaml'} plans more than {MAX_PLANNED_JOBS:,} jobs; moe-lab does not expand "
            "it (a damaged file, or not a sweep moe-lab ran)"
        )
    choices = [
        [f"{key}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [f"{key}={o.get_value_element_as_str()}"]
        for key, o in zip(keys, parsed)
    ]
    return [list(job) for job in itertools.product(*dict(zip(keys, choices)).values())]


def _count_values(override) -> Optional[int]:
    """How many values a parsed override stands for, counted without listing them (a range by its arithmetic); None
    for a sweep whose values this file alone cannot list."""
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    if not override.is_sweep_override():
        return 1
    value = override.value()
    if isinstance(value, RangeSweep):
        if value.start is None or value.stop is None:
            return None
        if value.step == 0:
            return 0
        return max(0, math.ceil((value.stop - value.start) / value.step))
    if isinstance(value, ChoiceSweep):
        return len(value.list)
    return None


def _sweeper(multirun: dict) -> dict:
    sweeper = (multirun.get("hydra") or {}).get("sweeper") if isinstance(multirun.get("hydra"), dict) else None
    return sweeper if isinstance(sweeper, dict) else {}


def job_folders(sweep_dir: Path) -> dict[int, Path]:
    """The folders of the jobs that started, by Hydra's job number: read from each folder's `.hydra/hydra.yaml`
    (`hydra.job.num`), since `hydra.sweep.subdir` may name the folders otherwise (`${seed}`); a folder without it
    counts by its name when that is a number."""
    found = {}
    for folder in Path(sweep_dir).iterdir():
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            saved = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
            number = saved["hydra"]["job"]["num"]
        except (OSError, yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError):
            number = int(folder.name) if folder.name.isdigit() else None
        if isinstance(number, int):
            found[number] = folder
    return dict(sorted(found.items()))


def same_sweep(sweep_dir: Path, overrides: list[str], sweeper_params: Optional[dict] = None) -> bool:
    """Whether `sweep_dir` holds a sweep started with these command-line overrides (Hydra's own aside: hydra.* values
    and hydra/* groups such as the launcher, which Hydra keeps apart from the job's) and these sweeper params (the
    command's `hydra.sweeper.params`): what the folder's multirun.yaml asks for is compared with what the command asks
    for, never taken from the folder. UserError when multirun.yaml is damaged."""
    multirun = _multirun(sweep_dir)
    task = _task_overrides(multirun) if multirun else None
    if task is None or task != [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]:
        return False
    params = _sweeper(multirun or {}).get("params") or {}
    return isinstance(params, dict) and {str(k): str(v) for k, v in params.items()} == (sweeper_params or {})


def set_aside(job: Path) -> Path:
    """Move the folder of a sweep job that did not finish to SWEEP/.attempts/JOB-K, as one rename (the attempt is whole
    where it lands); returns where it went."""
    attempts = job.parent / ATTEMPTS
    attempts.mkdir(exist_ok=True)
    number = 1 + sum(1 for p in attempts.iterdir() if p.name.startswith(f"{job.name}-"))
    os.rename(job, attempts / f"{job.name}-{number}")
    return attempts / f"{job.name}-{number}"


def set_aside_requeued(job: Path) -> Optional[Path]:
    """A job that ran before in this same sweep command and stopped (submitit requeued it after a pre-emption): its
    stopped run is set aside as an attempt to resume from, and the job folder keeps the configuration Hydra has just
    written for this run (.hydra). None for a job folder that holds no run."""
    import shutil

    if not run_markers(job):
        return None
    attempt = set_aside(job)
    job.mkdir()
    if (attempt / ".hydra").is_dir():
        shutil.copytree(attempt / ".hydra", job / ".hydra")
    return attempt


def continue_sweep(sweep_dir: Path) -> str:
    """Take over `sweep_dir` (UserError if the process that ran it is still alive, or another takes it at the same
    moment) and move every job that did not finish into SWEEP/.attempts/N-K; returns the line that says what happens
    to each job."""
    sweep_dir = Path(sweep_dir)
    claim = sweep_dir / CLAIM
    try:
        owner = int(claim.read_text().strip())
    except (OSError, ValueError):
        owner = None
    if owner is not None and owner != os.getpid() and process_alive(owner):
        raise UserError(f"the sweep in {sweep_dir} is being run by process {owner}; wait for it, or stop it first")
    if owner != os.getpid():
        claim.unlink(missing_ok=True)  # its owner is gone
        try:  # exclusive, as claim_run_dir: of two commands continuing the sweep at once, one gets it
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise UserError(f"the sweep in {sweep_dir} was just taken by another moe-lab command") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
    own_sweep(sweep_dir)
    planned = planned_jobs(sweep_dir)
    jobs = list(job_folders(sweep_dir).values())
    kept, moved = [], []
    for job in jobs:
        state, summary = job_state(job)
        if state in ("finished", "diverged"):  # kept: a diverged job would diverge again
            kept.append(f"{job.name} {state}")
            continue
        has_checkpoint = any((set_aside(job) / "checkpoints").glob("*.ckpt"))
        moved.append(
            f"{job.name} resumes from step {summary.get('step', '?')}"
            if has_checkpoint
            else f"{job.name} starts again (no checkpoint)"
        )
    not_started = (len(planned) - len(jobs)) if planned is not None else None
    parts = [
        f"{len(kept)} kept ({', '.join(kept)})" if kept else "",
        ", ".join(moved),
        f"{not_started} not started yet" if not_started else "",
    ]
    return (
        f"moe-lab: continuing the sweep in {sweep_dir} (the same command): "
        + "; ".join(p for p in parts if p)
        + f"; earlier attempts are kept in {sweep_dir / ATTEMPTS}"
    )


def not_started_rows(sweep_dir: Path) -> list[dict[str, str]]:
    """Rows for sweep_summary.csv of the planned jobs that have no folder yet."""
    planned = planned_jobs(sweep_dir) or []
    started = job_folders(sweep_dir)
    return [
        {"job": str(i), "status": "not started", "overrides": " ".join(job)}
        for i, job in enumerate(planned)
        if i not in started
    ]


def write_sweep_files(sweep_dir: Path) -> list[Path]:
    """sweep_summary.csv (every planned job, those not started too) and, when seeds repeat, sweep_groups.csv, from
    the job folders as they are now. Each job rewrites them when it ends, and `moe-lab dashboard SWEEP` whenever it is
    read, so that a sweep whose submitting process is gone (a SLURM sweep: hydra #3201) still has them whole."""
    from moe_lab.analysis.runs import sweep_runs, write_sweep_summary
    from moe_lab.analysis.seeds import write_group_summary

    summary = write_sweep_summary(sweep_dir, not_started_rows(sweep_dir))
    groups = write_group_summary(sweep_dir, sweep_runs(sweep_dir))
    return [summary] + ([groups] if groups else [])


def continued_job(run: "TrainConfig", output_dir: Path) -> Optional[dict[str, Any]]:
    """A job of a sweep that is being continued (the same command again, training/sweeps.py): the summary of a job that
    finished before, to skip it (a diverged one fails again at once, with its reason); for a job whose earlier run
    stopped, `run.ckpt_path` becomes that run's last checkpoint, so the job resumes from it. None otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    if not launched_worker():  # data-parallel workers only follow rank 0 (which they would not run without)
        if not claimed_by_this_sweep(Path(HydraConfig.get().sweep.dir)):
            return None
        state, summary = job_state(output_dir)
        if state == "diverged":
            raise Diverged(f"{summary.get('error', 'training diverged')} (an earlier run of this job; kept as it was)")
        if state == "finished":
            print(
                f"moe-lab: job {output_dir.name} finished before (val/loss {summary.get('val/loss')}): kept, not "
                "run again",
                flush=True,
            )
            return summary
        if state == "stopped" and set_aside_requeued(output_dir) is not None:
            print(f"moe-lab: job {output_dir.name} ran before in this sweep and stopped (a requeued job)", flush=True)
    else:
        wait_for_rank_zero_to_set_aside(output_dir)
    attempt = previous_attempt(output_dir)
    ckpt = attempt_checkpoint(attempt) if attempt is not None and run.ckpt_path is None else None
    if ckpt is not None:
        run.ckpt_path = str(ckpt)
        print(f"moe-lab: job {output_dir.name} resumes from {ckpt}", flush=True)
    return None


def wait_for_rank_zero_to_set_aside(output_dir: Path, timeout_s: float = 300.0) -> None:
    """In a rank > 0 of a requeued job (several tasks per job), the stopped run's summary is still in the job folder
    until rank 0 has set it aside: wait for that, so that every rank resumes from the same attempt."""
    import time

    deadline = time.monotonic() + timeout_s
    while (output_dir / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
