"""The command line: `moe-lab <command>` (`main.py`), its table of subcommands (`commands.py`) and their shared checks
(`checks.py`), the pre-flight check of `moe-lab train` (`preflight.py`, `hydra_args.py`, `inherited.py`), the Hydra
app around `train(cfg)` (`hydra_app.py`) and its callbacks (`hydra_callbacks.py`). Parsing and checks only: the work
is done in `moe_lab/training/` and `moe_lab/tools/`."""

from moe_lab.cli.main import main

__all__ = ["main"]
