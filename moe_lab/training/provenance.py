"""What produced a run: the code version and the software and machine it ran on.

Recorded in summary.json, every checkpoint (`moe_lab_run`), the W&B run's config and the findings' READMEs, so that a
number can be traced to the commit and the setting that gave it. Nothing here imports torch at module level: the
configuration check and TAB completion stay light.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

# The packages whose versions change a run's numbers or speed.
PACKAGES = ("torch", "lightning", "transformers", "hydra-core", "datasets")


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """{"commit", "dirty", "package"} when moe-lab runs from a git checkout (dirty: tracked files differ from the
    commit), else {"package": the installed moe-lab's version}. Computed once per process."""
    package = installed_version("moe-lab")
    root = Path(__file__).resolve().parents[2]  # moe_lab/training/provenance.py -> the checkout
    commit = _git(root, "rev-parse", "HEAD") if (root / ".git").exists() else None
    if commit is None:
        return {"package": package}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "package": package}


def describe_code(version: dict[str, Any]) -> str:
    """One line: `commit 1a2b3c4d5e6f (dirty)` or `moe-lab 0.1.0 (no git checkout)`."""
    if "commit" not in version:
        return f"moe-lab {version.get('package')} (no git checkout)"
    return f"commit {version['commit'][:12]}" + (" (dirty)" if version.get("dirty") else "")


def installed_version(name: str) -> Optional[str]:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, Optional[str]]:
    """{package: installed version, or None when it is not installed}."""
    return {name: installed_version(name) for name in PACKAGES}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_provenance(accelerator: str, devices: int, precision: str, threads: int) -> dict[str, Any]:
    """The record of one run: code version, package versions, machine, and how it computed."""
    import torch

    machine = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if accelerator == "gpu" and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {
        "code": code_version(),
        "packages": package_versions(),
        "machine": machine,
        "accelerator": accelerator,
        "devices": devices,
        "precision": precision,
    }
