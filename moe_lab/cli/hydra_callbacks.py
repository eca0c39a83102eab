"""Hydra callbacks of `moe-lab train` (registered in conf/hydra/default.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

from moe_lab.analysis.pages import write_dashboard
from moe_lab.analysis.runs import damaged_earlier_lines, ranked_table, sweep_runs
from moe_lab.analysis.seeds import configurations, group_table, has_seed_groups, seed_groups
from moe_lab.errors import UserError
from moe_lab.files import write_atomically
from moe_lab.training.sweeps import write_sweep_files


def _one_line(hook):
    """A callback whose UserError (a damaged job folder) is one `moe-lab: error:` line, not a Python warning (Hydra
    turns a callback's exception into one and carries on): the sweep then ends with exit code 1."""

    def wrapped(self, *args: Any, **kwargs: Any) -> None:
        try:
            hook(self, *args, **kwargs)
        except UserError as e:
            print(f"moe-lab: error: the sweep summary could not be written: {e}", file=sys.stderr, flush=True)
            if hook.__name__ == "on_multirun_end":
                raise SystemExit(1) from None

    return wrapped


class SweepSummary(Callback):
    """After every job of a multirun, failed ones included, rewrite sweep_summary.csv (a failed job also leaves its
    reason in error.txt) and, when seeds repeat, sweep_groups.csv; when the multirun ends, print the runs ranked by
    validation loss (and the seed groups with their intervals) and write the sweep dashboard. A sweeper that stops on
    a failure (Hydra's basic sweeper raises once its batch is done) still leaves a complete summary behind."""

    @_one_line
    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        from moe_lab.cli.hydra_app import JobFailed

        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            output_dir = Path(config.hydra.runtime.output_dir)
            if output_dir.is_dir():
                write_atomically(output_dir / "error.txt", f"{type(error).__name__}: {error}\n")
            if isinstance(error, JobFailed) and basic_sweeper(config):
                # A failure moe-lab explains: one line, and the sweep goes on (Hydra's basic sweeper would stop
                # after this batch with its traceback); the process exits 1 at the end if any job failed.
                print(f"moe-lab: job {config.hydra.job.num} failed: {error}", file=sys.stderr, flush=True)
                job_return.status, job_return.return_value = JobStatus.COMPLETED, None
        if config.hydra.mode == RunMode.MULTIRUN and Path(config.hydra.sweep.dir).is_dir():
            write_sweep_files(Path(config.hydra.sweep.dir))

    @_one_line
    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        written = write_sweep_files(sweep_dir)
        runs = sweep_runs(sweep_dir)
        for line in damaged_earlier_lines(runs):
            print(line, file=sys.stderr, flush=True)
        message = (
            f"\nmoe-lab: sweep of {len(runs)} runs, best validation loss first "
            f"('!': dead or starved experts)\n{ranked_table(runs)}\n"
            if runs
            else ""
        )
        groups = seed_groups(runs)
        if has_seed_groups(groups):
            message += (
                f"\nmoe-lab: {configurations(len(groups))} over seeds, best mean validation loss first\n"
                f"{group_table(groups)}\n"
            )
        message += f"moe-lab: sweep summary {' and '.join(map(str, written))}"
        if OmegaConf.select(config, "metrics.dashboard", default=True):
            message += f"\n  dashboard {write_dashboard(sweep_dir, sweep_dir / 'dashboard.html')}"
        print(message, flush=True)
        failed = [run.job for run in runs if run.status in ("failed", "diverged", "aborted")]
        # A job still "running" or "interrupted" once the sweep has ended was stopped or killed in a process of its own
        # (hydra/launcher=parallel, slurm, ray; under the basic launcher a stop ends the whole command instead).
        stopped = [run.job for run in runs if run.status in ("interrupted", "running")]
        if (failed or stopped) and basic_sweeper(config):  # other sweepers judge failures (Optuna: max_failure_rate)
            said = [f"job {', '.join(failed)} failed: the reason is in each job's error.txt"] if failed else []
            said += [f"job {', '.join(stopped)} stopped before the end"] if stopped else []
            print(
                f"moe-lab: error: {len(failed) + len(stopped)} of {len(runs)} jobs did not finish ({'; '.join(said)}); "
                "the same command again continues the sweep",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1)


def basic_sweeper(config) -> bool:
    """Whether Hydra's basic sweeper runs this sweep (a grid: every job is wanted, a failed one is the sweep's)."""
    return str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).endswith("BasicSweeper")
