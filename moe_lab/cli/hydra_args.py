"""The command line of `moe-lab train`, read the way Hydra reads it, so the pre-flight check knows which words are
overrides and which are Hydra's own flags.

Hydra keeps its argument parser private (`hydra._internal`), so its documented flags are declared here; a test holds
this list to the flags `moe-lab train --hydra-help` prints, so a Hydra that adds one fails the suite instead of
drifting silently.
"""

from __future__ import annotations

import argparse

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
