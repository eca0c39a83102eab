"""The command line: `moe-lab <command>` (`main.py`), the pre-flight check of `moe-lab train` (`preflight.py`,
`hydra_args.py`), the Hydra app around `train(cfg)` (`hydra_app.py`) and its callbacks (`hydra_callbacks.py`)."""

from moe_lab.cli.main import main

__all__ = ["main"]
