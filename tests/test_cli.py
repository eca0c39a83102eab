"""The installed `moe-lab` console script, run as a user runs it: in a subprocess, from another directory."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import FAST, REPO, moe_lab_script, run_cli

pytestmark = pytest.mark.slow


def fast_args(cache_dir: Path) -> list[str]:
    return FAST + [f"paths.cache_dir={cache_dir}"]


def val_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}


def test_help_lists_subcommands_and_groups(tmp_path):
    top = run_cli(["--help"], cwd=tmp_path)
    assert top.returncode == 0 and "train" in top.stdout
    train_help = run_cli(["train", "--help"], cwd=tmp_path)
    assert train_help.returncode == 0
    for group in ("model", "router", "experts", "capacity", "aux_loss", "data", "trainer", "logger", "experiment"):
        assert f"{group}:" in train_help.stdout, group
    unknown = run_cli(["tran"], cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'tran'" in unknown.stderr


def test_installed_script_finds_its_configs(tmp_path):
    info = run_cli(["train", "--info", "searchpath"], cwd=tmp_path)
    assert info.returncode == 0
    assert str(REPO / "conf") in info.stdout or "moe_lab/conf" in info.stdout
    cfg = run_cli(["train", "--cfg", "job", "experts=e16"], cwd=tmp_path)
    assert cfg.returncode == 0 and yaml.safe_load(cfg.stdout)["model"]["moe"]["num_experts"] == 16


def test_train_with_overrides_from_the_issue(tmp_path, cache_dir):
    overrides = ["experts=e16", "router=topk", "model.moe.router.top_k=1", "capacity=cf1_25", "aux_loss=switch_z"]
    run_dir = tmp_path / "run"
    result = run_cli(["train", *overrides, *fast_args(cache_dir), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moe-lab: run finished at step 12" in result.stdout
    # Not a terminal (a pipe here; nohup and SLURM alike): plain progress lines, no carriage returns in the log.
    assert "\r" not in result.stdout + result.stderr
    assert any(line.startswith("train: step 12/12, ") for line in result.stdout.splitlines()), result.stdout
    losses = val_losses(run_dir)
    assert losses[12] < losses[0] - 0.5
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["model"]["moe"]["num_experts"] == 16 and saved["model"]["moe"]["router"]["top_k"] == 1
    assert saved["model"]["moe"]["capacity_factor"] == 1.25
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["val/loss"] == pytest.approx(losses[12])
    assert "Traceback" not in result.stderr


def test_multirun_two_jobs(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "train",
            "-m",
            "experts=e4,e8",
            *fast_args(cache_dir),
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, experts in ((0, 4), (1, 8)):
        saved = yaml.safe_load((sweep / str(job) / ".hydra" / "config.yaml").read_text())
        assert saved["model"]["moe"]["num_experts"] == experts
        assert json.loads((sweep / str(job) / "summary.json").read_text())["status"] == "finished"


def test_bad_input_is_one_message_and_writes_nothing(tmp_path):
    for args, expected in (
        (["model.moe.router.top_k=9"], "must be in 1..num_experts"),
        (["experts=e99"], "is not an option"),
        (["model.moe.foo=1"], "is not a setting"),
        (["data=text", "data.path=missing.txt"], "no such file"),
    ):
        result = run_cli(["train", *args], cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("moe-lab: error:") and expected in lines[0], result.stderr
        assert not (tmp_path / "outputs").exists()


def signalled_training(tmp_path, cache_dir, run_dir, signals: list[tuple[float, int]]) -> tuple[int, str]:
    """(exit code, stderr) of a long `moe-lab train` sent `signals` (seconds to wait, then the signal) once training
    is under way."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [
        moe_lab_script(),
        "train",
        *fast_args(cache_dir),
        "trainer.max_steps=100000",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=100000",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until training is under way
            metrics = run_dir / "metrics.csv"
            if metrics.exists() and "train/loss" in metrics.read_text() or proc.poll() is not None:
                break
            time.sleep(0.5)
        for wait, signum in signals:
            time.sleep(wait)
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    returncode, err = signalled_training(tmp_path, cache_dir, run_dir, [(1.0, signal.SIGTERM)])
    assert returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM received" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] > 0
    # Resuming needs only the checkpoint (and here a new step budget): the run's overrides come with it.
    resumed = run_cli(
        [
            "train",
            f"trainer.max_steps={summary['step'] + 2}",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={tmp_path / 'resumed'}",
        ],
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {summary['step']} of {run_dir}" in resumed.stderr
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["step"] == summary["step"] + 2
    config = yaml.safe_load((tmp_path / "resumed" / ".hydra" / "config.yaml").read_text())
    assert config["model"]["d_model"] == 64 and config["paths"]["cache_dir"] == str(cache_dir)
    # The finished resumed run: nothing to do, said before anything is written.
    again = run_cli(
        [
            "train",
            f"ckpt_path={tmp_path / 'resumed' / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={tmp_path / 'again'}",
        ],
        cwd=tmp_path,
    )
    assert again.returncode == 2 and "moe-lab: error: nothing to do:" in again.stderr, again.stderr[-2000:]
    assert not (tmp_path / "again").exists()


@pytest.mark.slow
def test_two_ctrl_c_abort_with_exit_130_and_a_summary(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    returncode, err = signalled_training(tmp_path, cache_dir, run_dir, [(0.0, signal.SIGINT), (0.3, signal.SIGINT)])
    assert returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    # The first Ctrl-C's checkpoint may have been written before the second came: either way the summary says so.
    assert summary["status"] in ("aborted", "interrupted"), summary
    if summary["status"] == "aborted":
        assert "aborted at step" in err


def test_wandb_without_credentials_runs_offline(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = run_cli(
        ["train", "logger=wandb", *fast_args(cache_dir), "trainer.max_steps=3", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env_extra={"WANDB_MODE": "", "HOME": str(tmp_path), "WANDB_DIR": str(run_dir)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging offline" in result.stderr
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "metrics.csv").is_file()


def test_shell_completion(tmp_path):
    env = {"COMP_LINE": "moe-lab train exp", "COMP_POINT": str(len("moe-lab train exp"))}
    result = run_cli(["-sc", "query=bash"], cwd=tmp_path, env_extra=env)
    assert result.returncode == 0 and "experts=" in result.stdout and "experiment=" in result.stdout
    env = {"COMP_LINE": "moe-lab tr", "COMP_POINT": "10"}
    assert run_cli(["-sc", "query=bash"], cwd=tmp_path, env_extra=env).stdout.split() == ["train"]


def test_wheel_carries_the_configs(tmp_path):
    """A non-editable install has no conf/ beside the package: the wheel must carry it (style-anchors.md 5), and
    moe-lab's launchers in the hydra_plugins namespace."""
    pytest.importorskip("hatchling")
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            *map(str, wheel_dir.glob("*.whl")),
        ],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    shown = subprocess.run(
        [sys.executable, "-m", "moe_lab", "train", "--cfg", "job", "experts=e4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["model"]["moe"]["num_experts"] == 4
    where = subprocess.run(
        [sys.executable, "-c", "from moe_lab.training.schemas import config_dir; print(config_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip() == str(target / "moe_lab" / "conf")
    # The launchers of hydra/launcher=parallel and slurm, where Hydra looks for plugins (a namespace package).
    assert (target / "hydra_plugins" / "moe_lab_launchers" / "__init__.py").is_file()
    assert not (target / "hydra_plugins" / "__init__.py").exists()


def test_export_command(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    trained = run_cli(
        ["train", *fast_args(cache_dir), "capacity=dropless", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    exported = run_cli(["export", ckpt, "--format", "hf", str(tmp_path / "hf")], cwd=tmp_path)
    assert exported.returncode == 0 and "wrote MixtralForCausalLM" in exported.stdout, exported.stderr
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    again = run_cli(["export", ckpt, "--format", "hf", str(tmp_path / "hf")], cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.startswith("moe-lab: error:") and "not empty" in again.stderr


def test_moe_lab_reads_hydra_flags_as_hydra_does(tmp_path):
    """cli/hydra_args.py declares Hydra's flags (Hydra keeps its parser private): they must be the flags Hydra
    itself lists, so a new Hydra flag fails here instead of being read as an override."""
    import re

    from moe_lab.cli.hydra_args import hydra_arguments

    shown = run_cli(["train", "--hydra-help"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    flags_section = shown.stdout.split("== Flags ==")[1].split("== Configuration groups ==")[0]
    hydra_flags = {
        flag
        for line in flags_section.splitlines()
        if (m := re.match(r"^(-[\w-]+(?:,-[\w-]+)*) :", line))
        for flag in m.group(1).split(",")
    }
    ours = {flag for action in hydra_arguments()._actions for flag in action.option_strings}
    assert hydra_flags and ours == hydra_flags


def test_two_hydra_modes_at_once_are_one_error_line(tmp_path):
    """Hydra raises a bare ValueError for -m with --cfg; moe-lab says what to do instead."""
    shown = run_cli(["train", "-m", "seed=1,2", "--cfg", "job"], cwd=tmp_path)
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert shown.stderr.strip().splitlines()[-1].startswith("moe-lab: error: -m and --cfg cannot go together")


def test_a_killed_run_keeps_its_curves(tmp_path, cache_dir):
    """Every logged row is on disk by the next log step: a run killed outright (SIGKILL: no handler, no flush at
    exit) still has the rows of every step it logged, and a live dashboard sees them while it runs."""
    run_dir = tmp_path / "run"
    args = [
        moe_lab_script(),
        "train",
        *fast_args(cache_dir),
        "trainer.max_steps=100000",
        "trainer.log_every_n_steps=2",
        "trainer.val_check_interval=100000",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            routing = run_dir / "routing.jsonl"
            if routing.exists() and len(routing.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    logged = [json.loads(line)["step"] for line in (run_dir / "routing.jsonl").read_text().splitlines()[:3]]
    with open(run_dir / "metrics.csv") as f:
        rows = {int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert set(logged) <= rows, (logged, sorted(rows))


def test_a_run_without_hydra_run_dir_writes_one_folder(tmp_path, cache_dir):
    """Without hydra.run.dir the run goes to outputs/DATE/TIME: the folder the pre-flight claimed is the one Hydra
    writes (it resolved ${now:...} again seconds later and left the claimed folder empty beside the run's)."""
    result = run_cli(["train", *fast_args(cache_dir), "trainer.max_steps=2", "metrics.dashboard=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = [p for day in (tmp_path / "outputs").iterdir() for p in day.iterdir()]
    assert len(folders) == 1 and (folders[0] / "summary.json").is_file(), folders
    assert f"run directory {folders[0]}" in result.stdout + result.stderr


def test_the_preflight_pins_the_sweep_directory_it_claims(tmp_path, cache_dir, monkeypatch):
    """A sweep without hydra.sweep.dir: the override naming the directory the pre-flight claimed is handed to Hydra
    (quoted in Hydra's grammar), and none is added where the command line names the directory itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from moe_lab.cli.preflight import preflight
    from moe_lab.training.run_dir import claimed_by_this_process

    monkeypatch.chdir(tmp_path)
    pinned: list[str] = []
    assert preflight(["-m", "seed=1,2", *fast_args(cache_dir)], claim=True, pinned=pinned) is None
    assert len(pinned) == 1 and pinned[0].startswith("hydra.sweep.dir=")
    claimed = tmp_path / OverridesParser.create().parse_overrides(pinned)[0].value()  # relative to the cwd, as Hydra
    assert claimed.parent.parent == tmp_path / "outputs" / "multirun" and claimed_by_this_process(claimed)
    named: list[str] = []
    args = ["-m", "seed=1,2", *fast_args(cache_dir), f"hydra.sweep.dir={tmp_path / 'mine'}"]
    assert preflight(args, claim=True, pinned=named) is None and named == []


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    """`moe-lab --version`: the package's version, and the commit when it runs from a git checkout."""
    from moe_lab import __version__
    from moe_lab.cli.main import main
    from moe_lab.training.provenance import code_version

    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"moe-lab {__version__}") and out.count("\n") == 1
    if "commit" in code_version():
        assert f"(commit {code_version()['commit'][:12]}" in out
