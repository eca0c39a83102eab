"""The checks every subcommand shares, made before any work starts, and moe-lab's one error line.

Every mistake a user can make on the command line ends as one `moe-lab: error: ...` line and exit status 2: argparse's
own errors (`ArgumentParser`), a `UserError` from a check or a tool (`one_line_errors`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from moe_lab.errors import UserError


def fail(message: str) -> int:
    print(f"moe-lab: error: {message}", file=sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with moe-lab's one-line errors: `moe-lab: error: ...`, exit 2."""

    def error(self, message: str):
        raise SystemExit(fail(f"{self.prog}: {message} (see {self.prog} --help)"))


def one_line_errors(run: Callable[[Any], int], parsed: Any) -> int:
    """`run(parsed)`, with a UserError turned into moe-lab's one error line (exit 2)."""
    try:
        return run(parsed)
    except UserError as e:
        return fail(str(e))


def output_file(path: Optional[str], flag: str, new: bool = False) -> Optional[Path]:
    """A file to write, in an existing folder (`new`: that does not exist yet either); None stays None."""
    if path is None:
        return None
    out = Path(path).expanduser()
    if new and (out.exists() or not out.parent.is_dir()):
        raise UserError(f"{flag} {out}: give a new file in an existing folder (moe-lab never writes over files)")
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"{flag} {out}: give a file in an existing folder")
    return out


def input_file(path: str, flag: str) -> Path:
    """A file to read, which exists."""
    found = Path(path).expanduser()
    if not found.is_file():
        raise UserError(f"{flag} {found}: no such file")
    return found


def beside_the_run(source: str, kind: str, elsewhere: str, flag: str) -> str:
    """Where a command's report on `source` goes by default: RUN/analysis/CKPT.KIND.html for a checkpoint of a run
    (RUN/checkpoints/CKPT.ckpt), FOLDER/analysis/CKPT.KIND.html for another moe-lab checkpoint, and `elsewhere` in the
    current folder for a Hugging Face model (a model folder someone handed you, or a hub id, is not written into). The
    analysis folder is made here, so that the output check finds it."""
    from moe_lab.training.checkpoint import is_checkpoint

    path = Path(source).expanduser()
    if not is_checkpoint(path):
        return elsewhere
    holder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    try:
        (holder / "analysis").mkdir(exist_ok=True)
    except OSError as e:
        where = holder / "analysis"
        raise UserError(f"cannot write beside the checkpoint in {where} ({e.strerror}); give {flag} PATH") from None
    return str(holder / "analysis" / f"{path.stem}.{kind}.html")


def at_least(value: Optional[int], flag: str, minimum: int = 1) -> None:
    """UserError unless `value` is None or at least `minimum`."""
    if value is not None and value < minimum:
        raise UserError(f"{flag} {value} must be at least {minimum}")


def device(name: Optional[str]) -> None:
    """--device cuda needs a CUDA device (torch is imported only to ask)."""
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
