"""`moe-lab`: one console script with subcommands (the table is `COMMANDS` in `commands.py`).

`moe-lab train ...` hands everything after `train` to the `@hydra.main` app in `moe_lab/cli/hydra_app.py`, so Hydra's
own flags (-m, --cfg job, --info, --help, -sc) work as they do for any Hydra app. Before that, a preflight
composes the config the way Hydra will (each value of a sweep included) and validates it, so a mistake is one
clear message and nothing is written. Every other command parses its arguments with argparse and calls its tool.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from moe_lab.cli.checks import fail, one_line_errors
from moe_lab.cli.commands import COMMANDS
from moe_lab.training.run_dir import launched_worker
from moe_lab.training.runtime import short_openmp_spin

BY_NAME = {command.name: command for command in COMMANDS}

USAGE = """usage: moe-lab <command> [arguments]   (moe-lab --version: the version)

moe-lab: an experiment runner for Mixture-of-Experts language models.

commands:
{commands}

examples:
  moe-lab train                                          embedded data, tiny MoE, CPU: a few minutes
  moe-lab train experts=e16 model.moe.router.top_k=1 capacity=cf1_25 aux_loss=switch_z
  moe-lab train -m experts=e4,e8 aux_loss=none,switch    a sweep of 4 runs
  moe-lab train experts=e4,e8 seeds=3                    each over 3 seeds: means with 95% intervals
  moe-lab train ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt
  moe-lab export outputs/DATE/TIME/checkpoints/last.ckpt --format hf hf_model/
  moe-lab import allenai/OLMoE-1B-7B-0924 olmoe/               a Hugging Face MoE as a moe-lab checkpoint
  moe-lab generate olmoe/model.ckpt --prompt "def " --show-experts 3
  moe-lab eval outputs/DATE/TIME/checkpoints/last.ckpt data=text data.path=notes.txt
  moe-lab train model.init_from=DENSE.ckpt upcycle=copy experts=e8   sparse upcycling of a dense run

Tab completion (bash): eval "$(moe-lab train -sc install=bash)"
"""


def main(argv: Optional[list[str]] = None) -> int:
    short_openmp_spin()  # before anything loads torch: cores shared with other jobs (runtime.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-sc", "--shell-completion"):
        return complete(argv)
    if argv and argv[0] in ("--version", "-V"):
        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands="\n".join(f"  {c.name:<10} {c.summary}" for c in COMMANDS)))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BY_NAME and launched_worker():
        # A data-parallel worker that Lightning started by re-running this process's command line, which Hydra
        # holds without the subcommand: it is the same `train` run (rank 0 already checked the command line).
        return one_line_errors(lambda args: BY_NAME["train"].raw(args, check=False), argv)
    if name not in BY_NAME:
        return fail(f"unknown command {name!r}; the commands are: {', '.join(BY_NAME)} (see moe-lab --help)")
    command = BY_NAME[name]
    if command.raw is not None:
        return one_line_errors(command.raw, rest)
    parsed = command.parser().parse_args(rest)
    parsed.argv = rest
    return one_line_errors(command.run, parsed)


def version_line() -> str:
    """`moe-lab 0.1.0`, with the commit where moe-lab runs from a git checkout (what a bug report needs)."""
    from moe_lab.training.provenance import code_version

    version = code_version()
    package = version.get("package") or "(not installed)"
    if "commit" not in version:
        return f"moe-lab {package}"
    dirty = ", with uncommitted changes" if version.get("dirty") else ""
    return f"moe-lab {package} (commit {version['commit'][:12]}{dirty})"


def complete(argv: list[str]) -> int:
    """Shell completion: Hydra's bash function calls `moe-lab -sc query=bash` with the whole line in COMP_LINE."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) >= 2 and words[1] in BY_NAME and (len(words) > 2 or line.endswith(" ")):
        # Hydra strips the program name from COMP_LINE; strip the subcommand too, and move the cursor with it.
        cut = line.index(words[1]) + len(words[1])
        os.environ["COMP_LINE"] = line[: line.index(words[1])] + line[cut:].lstrip()
        removed = len(line) - len(os.environ["COMP_LINE"])
        os.environ["COMP_POINT"] = str(max(int(os.environ.get("COMP_POINT", len(line))) - removed, 0))
        sys.argv = [sys.argv[0]] + argv
        from moe_lab.cli.hydra_app import hydra_main

        hydra_main()
        return 0
    prefix = words[1] if len(words) == 2 and not line.endswith(" ") else ""
    print(" ".join(name for name in BY_NAME if name.startswith(prefix)))
    return 0


def entry() -> None:  # pragma: no cover - thin wrapper for `python -m moe_lab`
    raise SystemExit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
