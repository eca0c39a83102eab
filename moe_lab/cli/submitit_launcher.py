"""moe-lab's submitit launchers (`hydra/launcher=parallel`: submitit's local executor; `hydra/launcher=slurm`):
Hydra's submitit launchers, launching from a submitit folder made for this command, and a job that ends without a
result as one line (launchers.py).

submitit hands a job its function and hands back its result as pickles in the submitit folder (`%j_submitted.pkl`,
`%j_0_result.pkl`), and the sweep's own process unpickles the result file it finds at a job's id. The local executor's
job ids are process ids, so a handed sweep folder's old `.submitit/` can hold a result for every id a job may get; a
job that ends without writing its own (a signal, SIGKILL, the OOM killer) would then run the planted one. Each sweep
command therefore makes a new folder with a random name (`SWEEP/.submitit/DATE-TIME-XXXXXX/%j`, by `tempfile.mkdtemp`,
which fails rather than reuse a name): it holds only what this command and its jobs wrote. Nothing else of the sweep
folder is unpickled by any launcher moe-lab configures (the basic launcher runs jobs in-process; the Ray launcher
passes them through Ray's object store, not through files).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from moe_lab.cli.launchers import job_without_result

# Seconds the local executor's jobs are given to show a result file once their process has ended (see launch).
LOCAL_RESULT_GRACE_S = 2
# The parts of a submitit folder pattern that submitit fills in per job (its own list, utils.JobPaths).
_JOB_TAGS = ("%j", "%t", "%A", "%a")


def fresh_submitit_folder(pattern: str) -> str:
    """`pattern` (submitit's folder, `SWEEP/.submitit/%j` by default) with a folder made now, for this command alone,
    where the per-job part begins: `SWEEP/.submitit/DATE-TIME-XXXXXX/%j`."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if any(tag in part for tag in _JOB_TAGS)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    base.mkdir(parents=True, exist_ok=True)
    made = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base)
    return str(Path(made, *parts[fixed:]))


class FreshFolderSubmititLauncher(submitit_launcher.BaseSubmititLauncher):
    """Hydra's submitit launcher (its `__call__`, which runs a job, is unchanged), launching from a new submitit folder
    and turning a job without a result into one line."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not getattr(self, "_folder_is_fresh", False):  # once per command (Optuna launches a batch at a time)
            self.params["submitit_folder"] = fresh_submitit_folder(str(self.params["submitit_folder"]))
            self._folder_is_fresh = True
        executor = self._executor()
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        jobs = executor.map_array(
            self,
            [list(o) for o in job_overrides],
            ["hydra.sweep.dir"] * len(job_overrides),
            list(numbers),
            [f"job_id_for_{n}" for n in numbers],
            [Singleton.get_state()] * len(job_overrides),
        )
        returns = []
        for number, overrides, job in zip(numbers, job_overrides, jobs):
            if self._EXECUTOR == "local":
                # submitit waits this long for the result file of a job that ended without one, for a cluster's
                # network filesystem to show it (15 s by default); a local job's own process wrote it to this host's
                # disk before it exited, so a killed job is reported without the wait.
                job._results_timeout_s = LOCAL_RESULT_GRACE_S
            try:
                returns.append(job.results()[0])
            except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as e:
                raised = isinstance(e, submitit.core.utils.FailedJobError)
                returns.append(job_without_result(self.config, number, overrides, str(job.paths.stderr), raised))
        return returns

    def _executor(self) -> Any:
        """submitit's executor with this launcher's parameters, as Hydra's launcher builds it."""
        import submitit

        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                (key if key in shared else f"{self._EXECUTOR}_{key}"): value
                for key, value in self.params.items()
                if key not in ("submitit_folder", "max_num_timeout")
            }
        )
        return executor
