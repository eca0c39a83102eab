"""Hostile input and faults: untrusted files are data, never code; damaged files and bad settings get one
`moe-lab: error:` line, a non-zero exit and no change to what exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab.errors import CheckpointError, UserError
from moe_lab.training.train import train

from conftest import FAST, run_cli, said


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
    args = (
        [command, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}"]
        if command == "train"
        else [command, str(ckpt), "--format", "hf", str(tmp_path / "hf")]
    )
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
    expected = {
        "not_moe_lab": "was not written by moe-lab",
        "directory": "is a directory",
        "link_loop": "no such checkpoint file",
    }.get(damage, "not a readable moe-lab checkpoint")
    with pytest.raises(CheckpointError, match=expected) as e:
        moe_lab.load_model(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["eval", "generate", "analyze", "export", "resume"])
def test_a_run_directory_given_for_a_checkpoint_points_at_its_checkpoint(command, real_checkpoint, tmp_path, capsys):
    """`moe-lab eval outputs/DATE/TIME` (the folder `ls` shows, not its checkpoint): one line that names the run's
    checkpoints/last.ckpt, rather than "has no config.json" (read as a Hugging Face folder) or a bare "a directory"."""
    from moe_lab.cli.main import main

    run = real_checkpoint.parent.parent
    args = {
        "eval": ["eval", str(run)],
        "generate": ["generate", str(run), "--prompt", "x"],
        "analyze": ["analyze", str(run)],
        "export": ["export", str(run), "--format", "hf", str(tmp_path / "hf")],
        "resume": ["train", f"ckpt_path={run}", f"hydra.run.dir={tmp_path / 'new'}", *FAST],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run} is a run directory; give its checkpoint, {real_checkpoint}" in err, err


@pytest.mark.slow
def test_export_of_a_truncated_checkpoint_is_one_line(real_checkpoint, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(real_checkpoint.read_bytes()[:1000])
    assert "not a readable moe-lab checkpoint" in one_error_line(
        run_cli(["export", str(bad), "--format", "hf", str(tmp_path / "hf")], cwd=tmp_path)
    )
    assert not (tmp_path / "hf").exists()


def test_hf_export_writes_safetensors(real_checkpoint, tmp_path):
    pytest.importorskip("transformers")
    from moe_lab.tools.export import export_hf

    export_hf(real_checkpoint, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()  # weights that cannot execute, as the field ships them
    assert not list((tmp_path / "hf").glob("*.bin"))


# -- bad settings and output locations: one line before anything runs ----------------------------------------


@pytest.mark.parametrize(
    "args,expected",
    [
        (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 must be a positive whole number"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be a positive whole number"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be a number of training batches"),
    ],
)
def test_trainer_values_that_fail_mid_training_are_refused_up_front(args, expected):
    from moe_lab.cli.preflight import preflight

    message = preflight(args)
    assert message is not None and expected in message and "\n" not in message


def test_a_gpu_trainer_without_a_gpu_is_refused_up_front(tmp_path):
    from moe_lab.cli.preflight import preflight

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    message = preflight(["trainer=gpu", f"hydra.run.dir={tmp_path / 'run'}"])
    assert message is not None and "needs a CUDA GPU and none is visible" in message
    assert not (tmp_path / "run").exists()


def test_a_run_directory_that_is_a_file_is_refused(tmp_path):
    from moe_lab.cli.preflight import preflight

    (tmp_path / "taken").write_text("my notes")
    assert "is a file, not a directory" in preflight([f"hydra.run.dir={tmp_path / 'taken'}"])
    assert "is a file" in preflight([f"hydra.run.dir={tmp_path / 'taken' / 'run'}"])
    assert "is a file" in preflight(["-m", "experts=e4,e8", f"hydra.sweep.dir={tmp_path / 'taken'}"])
    assert (tmp_path / "taken").read_text() == "my notes"


def test_an_unwritable_output_location_is_refused(tmp_path, monkeypatch):
    """Root ignores file modes, so the refusal of a read-only place is checked through what os.access reports."""
    import os

    from moe_lab.cli.preflight import preflight

    (tmp_path / "readonly").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == tmp_path / "readonly" else real_access(p, mode)
    )
    message = preflight([f"hydra.run.dir={tmp_path / 'readonly' / 'run'}"])
    assert message is not None and "cannot write in" in message and "permission denied" in message
    assert not (tmp_path / "readonly" / "run").exists()


# -- damaged run directories: the dashboard says which file --------------------------------------------------


@pytest.fixture
def run_dir(real_checkpoint, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(real_checkpoint.parents[1], copy, ignore=shutil.ignore_patterns("checkpoints", "dashboard.html"))
    return copy


def test_a_cut_off_last_routing_line_is_skipped(run_dir):
    from moe_lab.analysis.pages import write_dashboard

    text = (run_dir / "routing.jsonl").read_text()
    (run_dir / "routing.jsonl").write_text(text + text.splitlines()[-1][:40])  # a line still being written
    assert write_dashboard(run_dir).is_file()


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("binary_metrics", "metrics.csv is damaged"),
        ("corrupt_summary", "summary.json is damaged"),
        ("summary_not_an_object", "summary.json is damaged"),
        ("corrupt_routing_line", "routing.jsonl is damaged (line 1 is not JSON)"),
        (
            "routing_line_without_layers",
            "routing.jsonl is damaged (line 1 is not a routing record: no list of 'layers')",
        ),
        ("routing_layer_of_wrong_shape", "routing.jsonl is damaged (line 2 is not a routing record: a layer without"),
    ],
)
def test_damaged_run_files_are_named(run_dir, damage, expected):
    from moe_lab.analysis.pages import write_dashboard
    from moe_lab.errors import DashboardError

    if damage == "binary_metrics":
        (run_dir / "metrics.csv").write_bytes(bytes(range(256)) * 4)
    elif damage == "corrupt_summary":
        (run_dir / "summary.json").write_text('{"status": "fini')
    elif damage == "summary_not_an_object":
        (run_dir / "summary.json").write_text("[1, 2]")
    elif damage == "routing_line_without_layers":
        (run_dir / "routing.jsonl").write_text('{"step": 3}\n' + (run_dir / "routing.jsonl").read_text())
    elif damage == "routing_layer_of_wrong_shape":
        first = (run_dir / "routing.jsonl").read_text().splitlines()[0]
        (run_dir / "routing.jsonl").write_text(f'{first}\n{{"step": 4, "layers": [{{"layer": 0, "load": "x"}}]}}\n')
    else:
        (run_dir / "routing.jsonl").write_text("{not json\n" + (run_dir / "routing.jsonl").read_text())
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(DashboardError, match=re.escape(expected)):
        write_dashboard(run_dir)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_dashboard_output_into_a_missing_folder(run_dir, tmp_path):
    from moe_lab.analysis.pages import write_dashboard
    from moe_lab.errors import DashboardError

    with pytest.raises(DashboardError, match="does not exist"):
        write_dashboard(run_dir, tmp_path / "nowhere" / "page.html")
    with pytest.raises(DashboardError, match="is a directory"):
        write_dashboard(run_dir, tmp_path)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_dashboard_of_a_damaged_run_is_one_line(run_dir, tmp_path):
    (run_dir / "metrics.csv").write_bytes(b"\x00\xff" * 100)
    assert "metrics.csv is damaged" in one_error_line(run_cli(["dashboard", str(run_dir)], cwd=tmp_path))


def test_export_to_a_file_is_refused(real_checkpoint, tmp_path):
    pytest.importorskip("transformers")
    from moe_lab.errors import ExportError
    from moe_lab.tools.export import export_hf

    (tmp_path / "out").write_text("mine")
    with pytest.raises(ExportError, match="is a file"):
        export_hf(real_checkpoint, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,expected",
    [
        (["bench", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["bench", "--repeats", "0"], "--repeats must be at least 1"),
        (["export", "x.ckpt"], "the following arguments are required"),
        (["dashboard"], "the following arguments are required: PATH"),
        (["import", "x"], "the following arguments are required: out_dir"),
        (["generate", "x.ckpt", "--top-p", "x"], "argument --top-p: invalid float value"),
        (["eval"], "the following arguments are required: source"),
    ],
)
def test_subcommand_argument_errors_are_one_line(tmp_path, args, expected):
    assert expected in one_error_line(run_cli(args, cwd=tmp_path))


# -- divergence: caught at any step, never saved, reported with the last good checkpoint ----------------------


def test_divergence_at_a_step_that_logs_nothing(make_cfg, tmp_path):
    from moe_lab.errors import Diverged

    with pytest.raises(Diverged, match="the last good checkpoint is|no checkpoint was written") as e:
        train(
            make_cfg(
                "optim.lr=1e4",
                "optim.warmup_steps=0",
                "trainer.max_steps=6",
                "trainer.log_every_n_steps=10",
                "trainer.val_check_interval=100",
                "checkpoint.every_n_steps=2",
                name="run",
            )
        )
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())  # valid JSON: no NaN in it
    assert summary["status"] == "diverged" and "NaN or infinite" in summary["error"]
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):  # every checkpoint on disk has finite weights
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), ckpt.name
    if summary["checkpoint"] is not None:
        assert Path(summary["checkpoint"]).is_file() and summary["checkpoint"] in str(e.value)


def test_a_nonfinite_validation_loss_is_divergence(make_cfg, tmp_path, monkeypatch):
    from moe_lab.errors import Diverged
    from moe_lab.training.module import MoELanguageModel

    real = MoELanguageModel.validation_step

    def poisoned(self, batch, batch_idx):
        real(self, batch, batch_idx)
        if self.global_step >= 3:
            self._val_sums[0, 0] = float("nan")

    monkeypatch.setattr(MoELanguageModel, "validation_step", poisoned)
    with pytest.raises(Diverged, match="val/loss is nan at step 3"):
        train(make_cfg("trainer.max_steps=6", "trainer.val_check_interval=3", name="run"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.slow
def test_diverged_run_exits_non_zero_with_one_line(tmp_path, cache_dir):
    result = run_cli(
        [
            "train",
            *FAST,
            f"paths.cache_dir={cache_dir}",
            "optim.lr=1e4",
            "optim.warmup_steps=0",
            "trainer.max_steps=6",
            "trainer.log_every_n_steps=10",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("moe-lab: error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "Traceback" not in result.stderr
    json.loads((tmp_path / "run" / "summary.json").read_text())


# -- checkpoint writes are atomic in the checkpoint's own folder -----------------------------------------------


KILL_DURING_SAVE = """
import os, signal, sys, torch
from moe_lab.training.checkpoint import AtomicCheckpointIO
real_save = torch.save
def dies_half_way(obj, f, *args, **kwargs):
    f.write(b"x" * 100_000)  # part of the bytes are out when the process is killed
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dies_half_way
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, sys.argv[1])
"""


@pytest.mark.parametrize("existing", [True, False])
def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_whole(tmp_path, existing):
    """The temp dir stands on another filesystem here (TMPDIR is elsewhere); the save writes beside the checkpoint
    and renames, so a SIGKILL mid-write leaves last.ckpt as it was (or absent), never cut short."""
    import os
    import subprocess
    import sys

    from moe_lab.training.checkpoint import AtomicCheckpointIO

    ckpt_dir, other_tmp = tmp_path / "checkpoints", tmp_path / "elsewhere"
    ckpt_dir.mkdir()
    other_tmp.mkdir()
    last = ckpt_dir / "last.ckpt"
    if existing:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, last)
    before = last.read_bytes() if existing else None
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, str(last)],
        capture_output=True,
        env={**os.environ, "TMPDIR": str(other_tmp)},
    )
    assert killed.returncode == -9
    if existing:
        assert last.read_bytes() == before
        assert torch.equal(torch.load(last, weights_only=True)["state_dict"]["w"], torch.zeros(3))
    else:
        assert not last.exists()
    assert not list(other_tmp.iterdir())  # nothing was written to the other filesystem
    leftovers = list(ckpt_dir.glob(".last.ckpt.*.tmp"))  # a kill leaves its partial temp file beside the checkpoint
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 100_000
    from moe_lab.files import remove_stale_temp_files

    assert remove_stale_temp_files(ckpt_dir) == leftovers  # the next start or write here clears it (writer dead)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == (["last.ckpt"] if existing else [])


def test_partial_saves_of_a_live_writer_and_files_of_others_are_left_alone(tmp_path):
    import os

    from moe_lab.files import _HOST, remove_stale_temp_files, write_atomically

    live = tmp_path / f".last.ckpt.moe-lab-{_HOST}-{os.getppid()}-abc.tmp"  # a live process is writing it
    elsewhere = tmp_path / ".last.ckpt.moe-lab-otherhost-999999999-abc.tmp"  # another host on a shared filesystem
    foreign = tmp_path / ".notes.txt.abc.tmp"  # not moe-lab's naming
    for path in (live, elsewhere, foreign):
        path.write_bytes(b"x")
    write_atomically(tmp_path / "summary.json", "{}")
    assert remove_stale_temp_files(tmp_path) == []
    assert live.exists() and elsewhere.exists() and foreign.exists()


def test_a_failed_save_removes_its_temp_file(tmp_path, monkeypatch):
    from moe_lab.training.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(3)}, tmp_path / "last.ckpt")

    def fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(OSError):
        io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["w"], torch.zeros(3))


# -- a stop between log steps keeps its steps in the curve -------------------------------------------------------


@pytest.mark.slow
def test_sigterm_between_log_steps_leaves_no_hole_in_the_joined_curve(tmp_path, cache_dir):
    import csv
    import os
    import signal
    import subprocess
    import time

    from conftest import moe_lab_script

    def logged_steps(run: Path) -> list[int]:
        with open(run / "metrics.csv") as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]

    run_dir = tmp_path / "run"
    args = [
        moe_lab_script(),
        "train",
        *FAST,
        f"paths.cache_dir={cache_dir}",
        "trainer.max_steps=100000",
        "trainer.log_every_n_steps=7",
        "trainer.val_check_interval=100000",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # until some steps are logged
            if (run_dir / "routing.jsonl").exists():
                break
            time.sleep(0.2)
        time.sleep(1.3)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    stopped_at = json.loads((run_dir / "summary.json").read_text())["step"]
    first = logged_steps(run_dir)
    assert first[-1] == stopped_at  # the steps since the last log step were logged at the stop
    resumed = tmp_path / "resumed"
    result = run_cli(
        [
            "train",
            *FAST,
            f"paths.cache_dir={cache_dir}",
            f"trainer.max_steps={stopped_at + 10}",
            "trainer.log_every_n_steps=7",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={resumed}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    second = logged_steps(resumed)
    assert second[0] > stopped_at and second[-1] == stopped_at + 10
    windows = [b - a for a, b in zip([0, *first, *second], [*first, *second])]
    assert all(0 < w <= 7 for w in windows), (first, second)  # every step belongs to a logged window


# -- one run per directory, even when two start at once ---------------------------------------------------------


@pytest.mark.slow
def test_two_runs_started_into_one_directory_at_once(tmp_path, cache_dir):
    import subprocess

    from conftest import moe_lab_script

    run_dir = tmp_path / "shared"
    args = [
        moe_lab_script(),
        "train",
        *FAST,
        f"paths.cache_dir={cache_dir}",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run_dir}",
    ]
    procs = [
        subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [r[2][-1500:] for r in results]
    refused = next(err for code, _, err in results if code == 2)
    lines = [line for line in refused.splitlines() if line.strip()]
    # Refused at the claim ("already holds a run") or, when both passed the pre-flight together, at the atomic
    # claim itself ("was just taken by another moe-lab run").
    assert len(lines) == 1 and lines[0].startswith("moe-lab: error:")
    assert "already" in lines[0] or "just taken" in lines[0], lines[0]
    with open(run_dir / "metrics.csv") as f:  # one run's rows, once each
        steps = [int(r["step"]) for r in __import__("csv").DictReader(f) if r.get("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step000006.ckpt"]


def test_claiming_a_directory_is_exclusive(tmp_path):
    import os

    from moe_lab.training.run_dir import CLAIM, claim_run_dir

    claim_run_dir(tmp_path / "run")
    claim_run_dir(tmp_path / "run")  # this process's own claim stands
    (tmp_path / "run" / CLAIM).write_text(f"{os.getpid() + 1}\n")  # another process's claim
    with pytest.raises(UserError, match="already holds a run"):
        claim_run_dir(tmp_path / "run")


# -- pre-emption before the first step, and data errors before any directory ----------------------------------


@pytest.mark.slow
def test_sigterm_during_the_first_validation(tmp_path, cache_dir):
    import os
    import signal
    import subprocess
    import time

    from conftest import moe_lab_script

    run_dir = tmp_path / "run"
    args = [
        moe_lab_script(),
        "train",
        *FAST,
        f"paths.cache_dir={cache_dir}",
        "data.val_fraction=0.5",
        "data.max_val_blocks=1000",
        "trainer.max_steps=50",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # the header is printed just before the untrained model is validated
            if line.startswith("moe-lab: data "):
                break
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    if summary["step"] == 0:  # stopped in the validation: nothing trained, said in one line, nothing saved
        assert "SIGTERM before the first training step: nothing was trained" in err
        assert not (run_dir / "checkpoints").exists()
    else:  # the validation was over: the first step boundary saved a resumable checkpoint
        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == summary["step"]
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_data_error_is_found_before_any_directory_is_made(tmp_path, cache_dir):
    (tmp_path / "corpus.txt").write_bytes(bytes(range(128, 256)) * 40)  # not UTF-8
    run_dir = tmp_path / "run"
    args = [
        "train",
        *[a for a in FAST if "max_chars" not in a],
        f"paths.cache_dir={cache_dir}",
        "data=text",
        f"data.path={tmp_path / 'corpus.txt'}",
        f"hydra.run.dir={run_dir}",
    ]
    assert "UTF-8" in one_error_line(run_cli(args, cwd=tmp_path))
    assert not run_dir.exists()
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 2000)  # the corrected data
    result = run_cli([*args[:-1], f"hydra.run.dir={run_dir}", "trainer.max_steps=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


# -- checksums and broken weights ---------------------------------------------------------------------------------


def _flip_one_bit_of_a_weight(ckpt: Path, out: Path) -> None:
    """One bit of one weight flipped in the file's bytes, everything else as written."""
    data = bytearray(ckpt.read_bytes())
    loaded = torch.load(ckpt, weights_only=True)
    weight = loaded["state_dict"]["model.embed.weight"]
    needle = weight.reshape(-1)[:16].numpy().tobytes()
    at = data.find(needle)
    assert at > 0
    data[at + 5] ^= 0x01
    out.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_weight_is_found_on_load(real_checkpoint, tmp_path, capsys):
    from moe_lab.cli.main import main

    _flip_one_bit_of_a_weight(real_checkpoint, tmp_path / "flipped.ckpt")
    assert not torch.equal(
        torch.load(tmp_path / "flipped.ckpt", weights_only=True)["state_dict"]["model.embed.weight"],
        torch.load(real_checkpoint, weights_only=True)["state_dict"]["model.embed.weight"],
    )
    with pytest.raises(CheckpointError, match="flipped.ckpt is damaged: its weights do not match the checksum"):
        moe_lab.load_model(tmp_path / "flipped.ckpt")
    assert main(["generate", str(tmp_path / "flipped.ckpt"), "--prompt", "x"]) == 2
    assert "do not match the checksum" in capsys.readouterr().err
    moe_lab.load_model(real_checkpoint)  # the good one loads


def test_a_flipped_bit_in_an_adam_moment_stops_a_resume_before_its_folder_is_claimed(real_checkpoint, tmp_path, capsys):
    """The optimizer state carries a checksum as the weights do: a bit flipped in `exp_avg_sq` would otherwise resume
    silently with a wrong step size for that weight."""
    from moe_lab.cli.main import main

    data = bytearray(real_checkpoint.read_bytes())
    state = torch.load(real_checkpoint, weights_only=True)["optimizer_states"][0]["state"]
    moment = max((s["exp_avg_sq"] for s in state.values()), key=lambda t: t.numel())
    at = data.find(moment.reshape(-1)[:16].numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x01
    (tmp_path / "flipped.ckpt").write_bytes(bytes(data))
    run = tmp_path / "resumed"
    args = ["train", f"ckpt_path={tmp_path / 'flipped.ckpt'}", f"hydra.run.dir={run}", *FAST, "capacity=dropless"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "flipped.ckpt is damaged: its optimizer state does not match the checksum" in err, err[-2000:]
    assert not run.exists()


@pytest.mark.parametrize("command", ["generate", "eval", "analyze"])
def test_a_checkpoint_with_nan_weights_is_one_line_not_nul_bytes(command, real_checkpoint, tmp_path, cache_dir, capsys):
    """NaN weights saved as such (their checksum matches): generate would print NUL bytes with exit 0, eval and analyze
    report NaN. Each is one error line naming the weights, exit 2, nothing on standard output."""
    from moe_lab.cli.main import main
    from moe_lab.training.checkpoint import with_checksum

    ckpt = torch.load(real_checkpoint, weights_only=True)
    ckpt["state_dict"]["model.blocks.1.attn.q_proj.weight"][0, 0] = float("nan")
    torch.save(with_checksum(ckpt), tmp_path / "nan.ckpt")
    data = [o for o in FAST if o.startswith(("data.", "++data."))] + [f"paths.cache_dir={cache_dir}"]
    args = {
        "generate": ["--prompt", "the ", "--max-new-tokens", "4"],
        "eval": data,
        "analyze": [*data, "-o", str(tmp_path / "analysis")],
    }[command]
    assert main([command, str(tmp_path / "nan.ckpt"), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert "NaN or infinite values (blocks.1.attn.q_proj.weight)" in captured.err


@pytest.mark.parametrize("temperature", ["nan", "inf"])
def test_a_temperature_that_is_not_a_finite_number_is_refused(temperature, real_checkpoint, capsys):
    from moe_lab.cli.main import main

    assert main(["generate", str(real_checkpoint), "--prompt", "x", "--temperature", temperature]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "temperature must be a finite number >= 0" in captured.err
    assert captured.err.count("\n") == 1, captured.err


def test_a_checkpoint_with_nan_weights_is_not_exported(real_checkpoint, tmp_path):
    from moe_lab.tools.export import export_hf
    from moe_lab.training.checkpoint import with_checksum

    ckpt = torch.load(real_checkpoint, weights_only=True)
    ckpt["state_dict"]["model.blocks.0.attn.q_proj.weight"][0, 0] = float("nan")
    torch.save(with_checksum(ckpt), tmp_path / "nan.ckpt")  # a checksum that matches: the NaN was saved as such
    with pytest.raises(UserError, match="NaN or infinite values .*blocks.0.attn.q_proj.weight"):
        export_hf(tmp_path / "nan.ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# -- one line for each of these, before any work ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "checkpoint.keep=-5"], "checkpoint.keep=-5 must be -1"),
        (["train", "model.norm_eps=-1"], "model.norm_eps=-1.0 must be a positive number"),
        (["train", "model.rope_theta=0"], "model.rope_theta=0.0 must be a positive number"),
        (["train", "optim.eps=0"], "optim.eps=0.0 must be > 0"),
        (["train", "router=soft", "model.moe.router.top_k=3"], "router=soft sends every token to all"),
        (["dashboard", ".", "--live", "--interval", "0"], "--interval 0 must be at least 1"),
        (["dashboard", ".", "--live", "--interval", "-5"], "--interval -5 must be at least 1"),
    ],
)
def test_bad_values_are_one_line_before_any_work(args, expected, tmp_path, capsys, monkeypatch):
    from moe_lab.cli.main import main

    monkeypatch.chdir(tmp_path)
    extra = [f"hydra.run.dir={tmp_path / 'run'}", *FAST] if args[0] == "train" else []
    code = main(args + [a for a in extra if a.split("=")[0] not in " ".join(args)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_generate_html_into_a_directory_and_a_prompt_past_the_context(real_checkpoint, tmp_path, capsys):
    from moe_lab.cli.main import main

    assert (
        main(["generate", str(real_checkpoint), "--prompt", "x", "--show-experts", "0", "--html", str(tmp_path)]) == 2
    )
    assert "give a file in an existing folder" in capsys.readouterr().err
    long = "y" * 600  # the checkpoint's context is 128 tokens (FAST)
    assert main(["generate", str(real_checkpoint), "--prompt", long]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing streamed before the error line
    assert "leaves no room for a new token" in captured.err and captured.err.count("\n") == 1


def test_bench_out_that_holds_results_is_refused_before_the_benchmark(tmp_path, capsys):
    from moe_lab.cli.main import main

    (tmp_path / "file").write_text("mine")
    assert main(["bench", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "bench.json").write_text("{}")
    assert main(["bench", "--quick", "--out", str(tmp_path / "old")]) == 2
    assert "already holds a benchmark" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "old" / "bench.json").read_text() == "{}"


@pytest.fixture
def small_filesystem(tmp_path, real_checkpoint):
    """A real tmpfs with room for about one and a half checkpoints of the FAST model (the real_checkpoint fixture's
    size) and the run's logs; mounted for the test and unmounted after. Needs root (CI and the developer machines run
    as root); skipped with its reason elsewhere."""
    import os
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    size = int(1.5 * real_checkpoint.stat().st_size) + 256 * 1024
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_a_full_disk_at_the_final_save_names_the_last_good_checkpoint(layout, small_filesystem, cache_dir, tmp_path):
    """On a real filesystem that fills up (a tmpfs with room for one checkpoint): the periodic checkpoint of step 6 is
    written whole, the final save at step 9 finds the disk full. One `moe-lab: error:` line naming step 6's checkpoint
    (not torch's zip-writer traceback), exit code 1, summary.json with status failed, and no partial file left."""
    run = small_filesystem / "run"
    args = ["train", *FAST, "capacity=dropless", "trainer.max_steps=9", "trainer.val_check_interval=9"]
    args += ["checkpoint.format=sharded"] if layout == "sharded" else []
    result = run_cli(
        [*args, "metrics.dashboard=false", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"], cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = said(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("moe-lab: error: the disk is full"), result.stderr[-3000:]
    assert "at step 9; the last checkpoint written whole is" in lines[0] and "step000006.ckpt" in lines[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["checkpoint"].endswith("step000006.ckpt")
    assert "disk full" in summary["error"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step000006.ckpt"]  # no temp file
    assert (run / "checkpoints" / "last.ckpt").resolve().name == "step000006.ckpt"  # the link to it, as before the save
    from moe_lab.training.checkpoint import read_checkpoint

    read_checkpoint(run / "checkpoints" / "step000006.ckpt")  # whole: its checksums hold


def test_a_failed_jobs_row_shows_no_loss_it_never_reached(tmp_path):
    import csv

    from moe_lab.analysis.runs import write_sweep_summary

    for job, summary in (
        ("0", {"status": "finished", "step": 9, "val_step": 9, "val/loss": 2.0}),
        ("1", {"status": "diverged", "step": 7, "val_step": 0, "val/loss": 5.5}),
    ):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (tmp_path / job / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "1" / "error.txt").write_text("Diverged: loss is nan at step 7\n")
    rows = {r["job"]: r for r in csv.DictReader(open(write_sweep_summary(tmp_path)))}
    assert rows["0"]["val/loss"] == "2.0" and rows["1"]["val/loss"] == ""  # not step 0's 5.5
    assert rows["1"]["status"] == "failed" and rows["1"]["step"] == "7.0"
