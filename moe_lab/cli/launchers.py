"""What moe-lab's launchers share (the submitit ones in `submitit_launcher.py`, the Ray one in `ray_launcher.py`; Hydra
builds them from `hydra_plugins/moe_lab_launchers/`): a sweep job that ends without a result is one line and an
unfinished job of the sweep, not a traceback.

A job that runs in a process of its own can end without handing back a result: stopped by a signal (moe-lab turns
SIGTERM and Ctrl-C into exit codes 143 and 130), SIGKILL, the out-of-memory killer, a lost node. Hydra's plugins raise
their executor's error for it (submitit's UncompletedJobError, Ray's RayError), which ends the whole command with a
traceback while the other jobs' results wait. moe-lab says what happened to the job in one line, from what its folder
holds, and lets the sweep end as for a failed job: the summary lists it as not finished, the command exits 1, and the
same command again continues it from its last checkpoint, as under the basic launcher.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus, filter_overrides

from moe_lab.training.run_dir import job_state
from moe_lab.training.sweeps import job_folders


class JobStopped(Exception):
    """A sweep job that ended without a result: stopped by a signal or killed. The same command again continues it."""


def job_without_result(
    config: Any, number: int, overrides: Sequence[str], log: Optional[str] = None, raised: bool = False
) -> JobReturn:
    """Print the one line for sweep job `number`, which ended without a result, and return its JobReturn. Hydra's basic
    sweeper raises a failed job's error once the batch is done, with a traceback: there the job is completed with no
    value (the summary lists it as not finished and the command ends with exit code 1: cli/hydra_callbacks.py); other
    sweepers (Optuna) count it as a failed trial."""
    from moe_lab.cli.hydra_callbacks import basic_sweeper

    line = stopped_job_line(Path(str(config.hydra.sweep.dir)), number, overrides, log, raised)
    print(line, file=sys.stderr, flush=True)
    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    if not basic_sweeper(config):
        ret.status, ret.return_value = JobStatus.FAILED, JobStopped(line)
    return ret


def stopped_job_line(
    sweep_dir: Path, number: int, overrides: Sequence[str], log: Optional[str] = None, raised: bool = False
) -> str:
    """The one line for job `number`, which ended without a result, from what its folder says of it (`raised`: its
    process reported an error outside the run itself, which its log holds)."""
    folder = job_folders(sweep_dir).get(number)
    _, summary = job_state(folder) if folder is not None else ("stopped", {})
    status = summary.get("status")
    if status in ("interrupted", "aborted", "failed"):
        what = f"{status} at step {summary.get('step', '?')}"
        if summary.get("error"):
            what += f" ({str(summary['error']).splitlines()[0]})"
    elif raised:
        what = "its process failed outside the run (the error is in its log)"
    else:
        what = "ended without a word (killed: SIGKILL, the out-of-memory killer, or a lost node)"
    settings = " ".join(filter_overrides(list(overrides)))
    return (
        f"moe-lab: job {number}{f' ({settings})' if settings else ''} did not finish: {what}; the same command again "
        f"continues it from its last checkpoint" + (f" (its log: {log})" if log else "")
    )
