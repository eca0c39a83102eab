"""Runs a plan of training runs in this process, one after another, with `moe_lab.training.train.train(cfg)`.

The layout-invariance tests start it once under torchrun (2 gloo ranks: every run of the plan is a 2-rank DDP run,
the process group is set up once) and once as a plain process (1 rank), so a hundred small runs cost seconds each
rather than a process launch each. Usage: python layout_worker.py PLAN.json, where the plan is a list of
{"dir": RUN_DIR, "overrides": [...]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from moe_lab.training.schemas import config_dir
from moe_lab.training.train import train


def main(plan_file: str) -> None:
    torch.set_num_threads(1)
    for run in json.loads(Path(plan_file).read_text()):
        torch.use_deterministic_algorithms(False)  # as a fresh process starts; trainer.deterministic=true sets it
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*run["overrides"], f"paths.output_dir={run['dir']}"])
        GlobalHydra.instance().clear()
        train(cfg)


if __name__ == "__main__":
    main(sys.argv[1])
