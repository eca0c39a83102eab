"""Hostile input and faults: untrusted files are data, never code; damaged files and bad settings get one
`moe-lab: error:` line, a non-zero exit and no change to what exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moe_lab
from conftest import FAST, run_cli
from moe_lab.errors import CheckpointError, UserError
from moe_lab.training.train import train


class WritesAMarker:
    """A pickled object whose unpickling creates a file: what a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"hyper_parameters": {"model": {"name": "tiny"}}, "state_dict": WritesAMarker(marker)}, path)
    return path


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("moe-lab: error:"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory, cache_dir) -> Path:
    from conftest import compose_cfg

    root = tmp_path_factory.mktemp("real")
    train(compose_cfg(["trainer.max_steps=2", "capacity=dropless", "metrics.dashboard=false"], output_dir=root / "run",
                      cache=cache_dir))
    return root / "run" / "checkpoints" / "last.ckpt"


# -- a checkpoint is data, never code -------------------------------------------------------------------------


def test_malicious_checkpoint_runs_nothing_through_load_model(tmp_path):
    ckpt = malicious_checkpoint(tmp_path / "evil.ckpt", tmp_path / "marker")
    with pytest.raises(CheckpointError, match="not a readable moe-lab checkpoint"):
        moe_lab.load_model(ckpt)
    assert not (tmp_path / "marker").exists()
    torch.load(ckpt, weights_only=False)  # the file really is malicious: unpickled as code, it writes the marker
    assert (tmp_path / "marker").exists()


def test_malicious_checkpoint_runs_nothing_through_train(make_cfg, tmp_path):
    ckpt = malicious_checkpoint(tmp_path / "evil.ckpt", tmp_path / "marker")
    with pytest.raises(CheckpointError, match="not a readable moe-lab checkpoint"):
        train(make_cfg(f"ckpt_path={ckpt}", name="run"))
    assert not (tmp_path / "marker").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "export"])
def test_malicious_checkpoint_runs_nothing_through_the_command_line(tmp_path, command):
    ckpt = malicious_checkpoint(tmp_path / "evil.ckpt", tmp_path / "marker")
    args = ([command, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}"] if command == "train"
            else [command, str(ckpt), "--format", "hf", str(tmp_path / "hf")])
    line = one_error_line(run_cli(args, cwd=tmp_path))
    assert "not a readable moe-lab checkpoint" in line
    assert not (tmp_path / "marker").exists() and not (tmp_path / "run").exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_moe_lab", "text", "directory", "link_loop"])
def test_damaged_checkpoints_are_one_clear_error(real_checkpoint, tmp_path, damage):
    path = tmp_path / "bad.ckpt"
    if damage == "truncated":
        path.write_bytes(real_checkpoint.read_bytes()[: real_checkpoint.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_moe_lab":
        torch.save({"weights": torch.zeros(3)}, path)
    elif damage == "text":
        path.write_text("not a checkpoint\n")
    elif damage == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "loop.ckpt")
        (tmp_path / "loop.ckpt").symlink_to(path)
    expected = {"not_moe_lab": "was not written by moe-lab", "directory": "is a directory",
                "link_loop": "no such checkpoint file"}.get(damage, "not a readable moe-lab checkpoint")
    with pytest.raises(CheckpointError, match=expected) as e:
        moe_lab.load_model(path)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_export_of_a_truncated_checkpoint_is_one_line(real_checkpoint, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(real_checkpoint.read_bytes()[:1000])
    assert "not a readable moe-lab checkpoint" in one_error_line(
        run_cli(["export", str(bad), "--format", "hf", str(tmp_path / "hf")], cwd=tmp_path))
    assert not (tmp_path / "hf").exists()


def test_hf_export_writes_safetensors(real_checkpoint, tmp_path):
    pytest.importorskip("transformers")
    from moe_lab.tools.export import export_hf

    export_hf(real_checkpoint, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()  # weights that cannot execute, as the field ships them
    assert not list((tmp_path / "hf").glob("*.bin"))
