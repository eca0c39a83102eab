"""Every run says what produced it: the code version, the packages, the machine and the precision, in summary.json,
every checkpoint and the loggers' config."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_lab.training import provenance


def _git_checkout(tmp_path: Path) -> Path:
    """A copy of moe_lab's provenance module inside a fresh git repository, as a checkout would hold it."""
    root = tmp_path / "checkout"
    _module_copy(root)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    return root


def _module_copy(root: Path) -> None:
    """moe_lab/training/provenance.py under `root`, as a checkout or an installed copy holds it."""
    (root / "moe_lab" / "training").mkdir(parents=True)
    shutil.copy(provenance.__file__, root / "moe_lab" / "training" / "provenance.py")
    (root / "moe_lab" / "__init__.py").write_text("")
    (root / "moe_lab" / "training" / "__init__.py").write_text("")


def _code_version_of(root: Path) -> dict:
    script = "import json, moe_lab.training.provenance as p; print(json.dumps(p.code_version()))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_names_the_commit_and_whether_the_tree_was_dirty(tmp_path):
    root = _git_checkout(tmp_path)
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    clean = _code_version_of(root)
    assert clean == {"commit": head, "dirty": False, "package": importlib.metadata.version("moe-lab")}
    (root / "moe_lab" / "__init__.py").write_text("# edited\n")
    assert _code_version_of(root)["dirty"] is True
    assert provenance.describe_code({"commit": head, "dirty": True}) == f"commit {head[:12]} (dirty)"


def test_outside_a_checkout_the_package_version_is_the_code_version(tmp_path):
    root = tmp_path / "installed"
    _module_copy(root)
    assert _code_version_of(root) == {"package": importlib.metadata.version("moe-lab")}
    assert provenance.describe_code({"package": "9.9.9"}) == "moe-lab 9.9.9 (no git checkout)"


def test_a_run_records_what_produced_it(make_cfg, tmp_path, capsys):
    from moe_lab.training.train import train

    summary = train(make_cfg("trainer.max_steps=2", "metrics.dashboard=false"))
    record = json.loads((Path(summary["output_dir"]) / "summary.json").read_text())["produced_by"]
    assert record["code"] == provenance.code_version()
    assert record["packages"]["torch"] == importlib.metadata.version("torch")
    assert record["packages"]["lightning"] and "transformers" in record["packages"]
    assert record["machine"]["cpu"] == provenance.cpu_model() and record["machine"]["threads"] == 2
    assert (record["accelerator"], record["precision"], record["compile"]) == ("cpu", "32-true", False)
    ckpt = torch.load(Path(summary["checkpoint"]), weights_only=True)
    assert ckpt["moe_lab_run"]["produced_by"] == record
    assert f"moe-lab: code {provenance.describe_code(record['code'])}; torch" in capsys.readouterr().out


def test_the_loggers_config_carries_it(make_cfg, tmp_path):
    from moe_lab.training.loggers import build_loggers
    from moe_lab.training.schemas import validate

    cfg = make_cfg("logger=tensorboard")
    pytest.importorskip("tensorboard")
    record = {"code": {"package": "0.1.0"}, "precision": "32-true"}
    seen = {}
    loggers = build_loggers(validate(cfg), cfg, tmp_path, record)
    for logger in loggers:
        if hasattr(logger, "hparams"):
            seen.update(logger.hparams)
    assert seen.get("produced_by") == record
