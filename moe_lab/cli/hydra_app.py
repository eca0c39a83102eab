"""The thin `@hydra.main` around `moe_lab.training.train.train(cfg)`: Hydra's flags, sweeps and run directories,
and the exit codes of a run (2: a user's mistake, 1: divergence or a full disk, 128 + signal: Ctrl-C or SIGTERM)."""

from __future__ import annotations

import logging
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig

from moe_lab.errors import RunFailed, UserError
from moe_lab.training.schemas import config_dir

log = logging.getLogger("moe_lab")


class JobFailed(Exception):
    """A sweep job that failed for a reason moe-lab explains (bad input, divergence): one line, no traceback."""


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    """Returns the final validation loss, the value Hydra sweepers minimise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from moe_lab.training.train import Interrupted, train

    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = train(cfg)
    except (UserError, RunFailed) as e:
        if sweeping:  # a failed job: the sweeper carries on or stops (Optuna: max_failure_rate)
            log.error("moe-lab: job failed: %s", e)
            raise JobFailed(str(e)) from None
        print(f"moe-lab: error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, UserError) else 1) from None
    except Interrupted as e:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the process is ending: a late Ctrl-C prints no traceback
        if sweeping:  # Hydra calls no callback on an exit: the summary lists the stopped job with its checkpoint
            from pathlib import Path

            from moe_lab.analysis.runs import write_sweep_summary
            from moe_lab.training.sweeps import not_started_rows

            sweep_dir = Path(HydraConfig.get().sweep.dir)
            write_sweep_summary(sweep_dir, not_started_rows(sweep_dir))
            print(
                f"moe-lab: the sweep stopped; the same command again continues it ({sweep_dir / 'sweep_summary.csv'} "
                "lists every job's state)",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(128 + e.signum) from None
    return summary.get("val/loss")
