"""moe-lab's Ray launcher (`hydra/launcher=ray`): Hydra's Ray launcher, its jobs started as Hydra's are (through Ray's
object store: nothing of the sweep folder is unpickled), with a job that ends without a result (killed, its worker or
node lost) as one line and an unfinished job of the sweep (launchers.py), rather than Ray's traceback ending the
command while the other jobs' results wait."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, setup_globals
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
from omegaconf import open_dict

from moe_lab.cli.launchers import job_without_result


class ReportingRayLauncher(RayLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray
        from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray, start_ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        start_ray(self.ray_cfg.init)
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        runs = []
        for number, overrides in zip(numbers, job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"job_id_for_{number}"  # the job's own id is set where it runs
                sweep_config.hydra.job.num = number
            remote = self.ray_cfg.remote
            runs.append(
                launch_job_on_ray(self.hydra_context, remote, sweep_config, self.task_function, Singleton.get_state())
            )
        returns = []
        for number, overrides, run in zip(numbers, job_overrides, runs):
            try:
                returns.append(ray.get(run))
            except ray.exceptions.RayError:
                returns.append(job_without_result(self.config, number, overrides))
        return returns
