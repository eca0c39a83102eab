"""The command line of `moe-lab train`, read the way Hydra reads it, so the pre-flight check knows which words are
overrides and which are Hydra's own flags.

Hydra keeps its argument parser private (`hydra._internal`), so its documented flags are declared here; a test holds
this list to the flags `moe-lab train --hydra-help` prints, so a Hydra that adds one fails the suite instead of
drifting silently.
"""

from __future__ import annotations

import argparse

from moe_lab.errors import UserError

INFO_CHOICES = ["all", "config", "defaults", "defaults-tree", "plugins", "searchpath"]
# Flags after which Hydra only shows something and runs nothing.
SHOW_ONLY = ("help", "hydra_help", "version", "cfg", "info", "shell_completion", "experimental_rerun")


def hydra_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lab train", add_help=False)
    parser.add_argument("--help", "-h", action="store_true")
    parser.add_argument("--hydra-help", action="store_true")
    parser.add_argument("--version", action="store_true")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    parser.add_argument("--resolve", action="store_true")
    parser.add_argument("--package", "-p")
    parser.add_argument("--run", "-r", action="store_true")
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--shell-completion", "-sc", action="store_true")
    parser.add_argument("--config-path", "-cp")
    parser.add_argument("--config-name", "-cn")
    parser.add_argument("--config-dir", "-cd")
    parser.add_argument("--experimental-rerun")
    parser.add_argument("--info", "-i", const="all", nargs="?", choices=INFO_CHOICES)
    return parser


def shows_only(parsed: argparse.Namespace) -> bool:
    return any(getattr(parsed, flag, None) for flag in SHOW_ONLY)


def expand_seeds(args: list[str]) -> list[str]:
    """`seeds=N`: the same sweep over N seeds, `seed=S,S+1,...` from the given seed (default: the config's), as a
    multirun: `moe-lab train experts=e8,e16 seeds=3` = `moe-lab train -m experts=e8,e16 seed=1234,1235,1236`."""
    given = [a for a in args if a.startswith("seeds=")]
    if not given:
        return args
    if len(given) > 1:
        raise UserError("seeds= is given more than once")
    count = given[0].partition("=")[2]
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"{given[0]}: give the number of seeds, e.g. seeds=3 (or seed=1,2,3 for chosen ones)")
    seed_args = [a for a in args if a.startswith("seed=")]
    if len(seed_args) > 1 or any("," in a or "(" in a for a in seed_args):
        raise UserError(
            f"{given[0]} and {' '.join(seed_args)}: give seeds=N (N seeds from seed=S) or a list seed=1,2,3, not both"
        )
    start = seed_args[0].partition("=")[2] if seed_args else None
    if start is None:
        from moe_lab.training.schemas import TrainConfig

        start = str(TrainConfig.seed)
    if not start.lstrip("-").isdigit():
        raise UserError(f"seed={start} must be an integer to count {given[0]} from")
    seeds = ",".join(str(int(start) + i) for i in range(int(count)))
    rest = [a for a in args if a not in given and a not in seed_args]
    multirun = [] if any(a in ("-m", "--multirun") for a in rest) else ["-m"]
    return multirun + rest + [f"seed={seeds}"]
