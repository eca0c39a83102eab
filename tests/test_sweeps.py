"""Sweeps: Hydra's basic multirun and the Optuna sweeper, the sweep summary, and failure tolerance."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import pytest
import yaml

from conftest import FAST, REPO, run_cli, said

pytestmark = pytest.mark.slow


def read_summary(sweep):
    with open(sweep / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


def test_basic_sweep_writes_a_summary_sorted_by_validation_loss(sweep_dir):
    rows = read_summary(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    losses = [float(r["val/loss"]) for r in rows]
    assert losses == sorted(losses)
    combos = {tuple(o for o in r["overrides"].split() if o.startswith(("experts=", "aux_loss="))) for r in rows}
    assert combos == {
        ("experts=e4", "aux_loss=none"),
        ("experts=e4", "aux_loss=switch"),
        ("experts=e8", "aux_loss=none"),
        ("experts=e8", "aux_loss=switch"),
    }
    for r in rows:
        assert float(r["moe/mean_imbalance"]) >= 1 and 0 <= float(r["moe/specialization"]) <= 1
        assert (sweep_dir / r["job"] / "dashboard.html").is_file()
    assert (sweep_dir / "dashboard.html").is_file()
    # The end of the sweep prints the same ranking in the terminal.
    printed = (sweep_dir.parent / "stdout.txt").read_text()
    table = printed.split("best validation loss first ('!': dead or starved experts)\n")[1].splitlines()
    assert table[0].split()[:4] == ["#", "run", "val/loss", "imbalance"]
    for rank, (line, row) in enumerate(zip(table[1:5], rows), 1):
        assert line.split()[0] == str(rank) and f"{float(row['val/loss']):.4f}" in line, (line, row)
        assert "experts=" in line and "aux_loss=" in line and line.rstrip().endswith("finished")
        # tokens/s: each run's average, as its summary.json and its own terminal summary say
        average = json.loads((sweep_dir / row["job"] / "summary.json").read_text())["tokens_per_sec_run"]
        assert float(row["tokens_per_sec_run"]) == average and f"{average:,.0f}" in line, (line, row)
    assert "tokens/s avg" in table[0]


def test_optuna_study_survives_a_diverged_trial(tmp_path, cache_dir):
    """Trial 0 (lr 1e6) diverges; with max_failure_rate 0.5 the study goes on and reports the other trial."""
    sweep = tmp_path / "study"
    fast = [o for o in FAST if not o.startswith("optim.lr=")]  # a command-line value would fix the searched lr
    result = run_cli(
        [
            "train",
            "--config-dir",
            str(REPO / "tests" / "configs"),
            "hparams_search=diverge",
            *fast,
            f"paths.cache_dir={cache_dir}",
            "optim.warmup_steps=0",
            "trainer.max_steps=6",
            "metrics.dashboard=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["finished", "failed"]
    failed = sweep / rows[1]["job"]
    assert "diverged" in (failed / "error.txt").read_text() and "optim.lr=1000000.0" in rows[1]["overrides"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"optim.lr": 0.003}
    assert best["best_value"] == pytest.approx(float(rows[0]["val/loss"]))
    assert "Traceback" not in result.stdout


def test_shipped_optuna_search(tmp_path, cache_dir):
    sweep = tmp_path / "study"
    fast = [o for o in FAST if not o.startswith("optim.lr=")]
    result = run_cli(
        [
            "train",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            *fast,
            f"paths.cache_dir={cache_dir}",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "metrics.dashboard=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    assert "alembic" not in result.stdout + result.stderr  # the in-memory study's storage says nothing
    for r in rows:  # each trial drew its own values for the searched parameters
        assert "optim.lr=" in r["overrides"] and "model.moe.router.top_k=" in r["overrides"]


def continue_and_check(args, cwd, sweep, jobs: str) -> None:
    """The same command again on a sweep whose job 0 finished and job 1 stopped: it continues the sweep, keeps job 0
    as it was, resumes job 1, and every job of `jobs` ends finished."""
    finished_0 = (sweep / "0" / "summary.json").read_text()
    again = run_cli(args, cwd=cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the sweep" in again.stderr and "1 resumes from step" in again.stderr
    assert (sweep / "0" / "summary.json").read_text() == finished_0  # kept, not run again
    rows = {r["job"]: r for r in read_summary(sweep)}
    assert [rows[j]["status"] for j in jobs] == ["finished"] * len(jobs)


def _sweep_args(cache_dir, sweep, *extra):
    return [
        "train",
        "-m",
        *[a for a in FAST if not a.startswith("trainer.log_every")],
        "trainer.log_every_n_steps=1",
        f"paths.cache_dir={cache_dir}",
        f"hydra.sweep.dir={sweep}",
        *extra,
    ]


def test_a_failed_job_is_one_line_and_the_sweep_goes_on(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = run_cli(_sweep_args(cache_dir, sweep, "optim.lr=1e6,3e-3", "trainer.max_steps=6"), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    lines = said(result.stderr)
    assert lines[0].startswith("moe-lab: job 0 failed: training diverged")
    assert lines[-1].startswith("moe-lab: error: 1 of 2 jobs did not finish (job 0 failed")
    rows = {r["job"]: r for r in read_summary(sweep)}
    assert rows["1"]["status"] == "finished" and rows["0"]["status"] == "failed"
    assert rows["0"]["val/loss"] == "" and "diverged" in rows["0"]["error"]
    assert "sweep of 2 runs" in result.stdout  # the end-of-sweep table was printed


def test_a_stopped_sweep_lists_every_job_and_the_same_command_continues_it(tmp_path, cache_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    sweep = tmp_path / "sweep"
    args = _sweep_args(cache_dir, sweep, "seed=1,2,3", "trainer.max_steps=24", "trainer.val_check_interval=24")
    script = str(Path(sys.executable).parent / "moe-lab")
    proc = subprocess.Popen(
        [script, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # job 1 is training
            metrics = sweep / "1" / "metrics.csv"
            if metrics.exists() and metrics.read_text().count("\n") >= 8:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    rows = {r["job"]: r for r in read_summary(sweep)}
    assert rows["0"]["status"] == "finished"
    assert rows["1"]["status"] == "interrupted" and rows["1"]["checkpoint"].endswith("last.ckpt")
    assert rows["1"]["val/loss"] == "" and 0 < float(rows["1"]["step"]) < 24
    assert rows["2"]["status"] == "not started" and "seed=3" in rows["2"]["overrides"]
    stopped_at = int(float(rows["1"]["step"]))
    continue_and_check(args, tmp_path, sweep, jobs="012")
    assert (sweep / ".attempts" / "1-1" / "checkpoints" / "last.ckpt").exists()  # the earlier attempt is kept
    resumed = json.loads((sweep / "1" / "resumed_from.json").read_text())
    assert resumed["step"] == stopped_at and resumed["run_dir"] == str(sweep / ".attempts" / "1-1")
    # The resumed job computed what one uninterrupted run computes (CPU, same seed): the same final weights.
    straight = tmp_path / "straight"
    plain = run_cli(
        _sweep_args(cache_dir, straight, "seed=2", "trainer.max_steps=24", "trainer.val_check_interval=24"),
        cwd=tmp_path,
    )
    assert plain.returncode == 0, plain.stderr[-2000:]
    a = torch.load(sweep / "1" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(straight / "0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_sweep_directory_of_another_command_is_refused(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    first = run_cli(_sweep_args(cache_dir, sweep, "seed=1,2", "trainer.max_steps=2"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    other = run_cli(_sweep_args(cache_dir, sweep, "seed=5,6", "trainer.max_steps=2"), cwd=tmp_path)
    assert other.returncode == 2 and "already holds runs of another command" in other.stderr


KILLED_JOB_STEPS = ["trainer.max_steps=90", "trainer.val_check_interval=90", "checkpoint.every_n_steps=6"]


def signal_a_job_mid_run(args: list[str], cwd: Path, sweep: Path, job: str, signum: int, at_once: str = ""):
    """Run the sweep `args`; once job `job` has a checkpoint (and every job of `at_once` runs at that moment), send it
    `signum`; returns (exit code, stderr) of the sweep command."""
    import os
    import subprocess
    import sys
    import time

    from moe_lab.files import process_alive

    script = str(Path(sys.executable).parent / "moe-lab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [script, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:

        def running(j: str) -> int:  # the process of job j's run (not of a stopped one a continued sweep sets aside)
            try:
                pid = int((sweep / j / ".moe-lab-run").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return 0
            return pid if process_alive(pid) else 0

        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (sweep / job / "checkpoints" / "last.ckpt").exists() and running(job):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        pid = {j: running(j) for j in {job, *at_once}}
        assert all(process_alive(pid[j]) for j in at_once), "the jobs were not running at the same time"
        os.kill(pid[job], signum)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, err


def kill_one_of_two_jobs_and_resume(args: list[str], cwd: Path, sweep: Path, planted: Optional[Path] = None) -> None:
    """Run the two-job sweep `args`; once job 1 has a checkpoint, check that both jobs run at once and SIGKILL job 1
    (no handler runs): one line says so (not the launcher's traceback), the command exits 1 and the summary lists
    job 1 as not finished. With `planted` (submitit's launchers), the folder is then handed over with a result pickle
    for every job id submitit could give (unpickled, it writes the file `planted`), and the same command again is
    stopped in job 1 by SIGTERM, which writes no result either: nothing planted runs, one line again. Then the same
    command again keeps job 0 and resumes job 1 from its checkpoint."""
    import signal

    def stopped_once(returncode: int, err: str, how: str) -> None:
        assert returncode == 1 and "Traceback" not in err and "UncompletedJobError" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("moe-lab: job 1 ")]
        assert len(lines) == 1 and "did not finish" in lines[0] and how in lines[0], err[-3000:]
        assert "the same command again continues" in lines[0]

    stopped_once(*signal_a_job_mid_run(args, cwd, sweep, "1", signal.SIGKILL, at_once="01"), how="killed")
    rows = {r["job"]: r for r in read_summary(sweep)}
    assert rows["0"]["status"] == "finished" and rows["1"]["status"] != "finished"
    if planted is not None:
        plant_result_pickles(sweep, planted)
        stopped_once(*signal_a_job_mid_run(args, cwd, sweep, "1", signal.SIGTERM), how="interrupted at step")
        assert not planted.exists(), "a pickle from the handed sweep folder was unpickled"
    continue_and_check(args, cwd, sweep, jobs="01")
    assert json.loads((sweep / "1" / "resumed_from.json").read_text())["step"] > 0
    assert (sweep / "dashboard.html").is_file()
    assert planted is None or not planted.exists()


class _PlantedResult:
    """What a hostile sweep folder holds in place of a submitit result: unpickling it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code from the sweep folder ran')",))


def plant_result_pickles(sweep: Path, marker: Path) -> int:
    """Leave a submitit result pickle (`.submitit/%j/%j_0_result.pkl`, submitit's default folder) for every job id
    the local executor can give next: its job ids are process ids, so every pid after this one (all of them where the
    system has at most 65536). Returns how many were planted."""
    import os
    import pickle

    payload = pickle.dumps(_PlantedResult(marker))
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        pid_max = 32768
    count = min(pid_max, 65536)
    for i in range(count):
        pid = (os.getpid() + 1 + i) % pid_max or 1
        folder = sweep / ".submitit" / str(pid)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{pid}_0_result.pkl").write_bytes(payload)
    return count


def test_jobs_run_at_once_under_submitit_and_a_killed_one_resumes_when_the_command_runs_again(tmp_path, cache_dir):
    """hydra/launcher=parallel (submitit's local executor, for real): two jobs train at the same time in their own
    processes; one is killed mid-run (SIGKILL: no handler runs), and is one line; the folder is handed over with a
    result pickle planted for every job id submitit could give, and the same command again, whose job 1 is stopped by
    SIGTERM (it writes no result), runs none of them; the same command again skips the finished job and resumes the
    stopped one from its last checkpoint; the summary is whole."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

    sweep = tmp_path / "sweep"
    args = _sweep_args(cache_dir, sweep, "hydra/launcher=parallel", "seed=1,2", *KILLED_JOB_STEPS)
    kill_one_of_two_jobs_and_resume(args, tmp_path, sweep, planted=tmp_path / "planted-pickle-ran")


def test_a_pre_empted_submitit_job_saves_is_requeued_and_resumes_in_the_same_command(tmp_path, cache_dir):
    """submitit's checkpointing protocol, for real on its local executor: the pre-emption signal (USR2) mid-run makes
    moe-lab save last.ckpt at the step boundary and hand the signal to submitit, which requeues the job; the requeued
    job resumes from that checkpoint and finishes, and the one sweep command ends with every job finished."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import signal

    sweep = tmp_path / "sweep"
    args = _sweep_args(cache_dir, sweep, "hydra/launcher=parallel", "seed=1", *KILLED_JOB_STEPS)
    returncode, err = signal_a_job_mid_run(args, tmp_path, sweep, "0", signal.SIGUSR2)
    assert returncode == 0, err[-3000:]
    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["finished"]
    resumed = json.loads((sweep / "0" / "resumed_from.json").read_text())
    assert 6 < resumed["step"] < 90 and ".attempts" in resumed["checkpoint"]  # saved at the signal, not periodic
    log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "SIGUSR2 received" in log and "Requeued job" in log, log[-3000:]


def test_jobs_run_at_once_on_a_ray_cluster_and_a_killed_one_resumes_when_the_command_runs_again(
    tmp_path, cache_dir, monkeypatch
):
    """hydra/launcher=ray on a Ray head the test starts on 127.0.0.1 (for real): two jobs train at the same time as Ray
    tasks; one is killed mid-run (SIGKILL), Ray does not run it again, and the same command again skips the finished
    job and resumes the killed one from its last checkpoint; the summary is whole."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a cluster of this machine alone, for the head and its clients
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2"]
        + ["--include-dashboard=false", "--disable-usage-stats"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while subprocess.run([ray, "status", f"--address=127.0.0.1:{port}"], capture_output=True).returncode != 0:
        assert time.time() < deadline and head.poll() is None, "the Ray head did not start"
        time.sleep(1)
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=ray", f"hydra.launcher.ray.init.address=127.0.0.1:{port}"]
    try:
        kill_one_of_two_jobs_and_resume(
            _sweep_args(cache_dir, sweep, *launcher, "seed=1,2", *KILLED_JOB_STEPS), tmp_path, sweep
        )
    finally:
        head.terminate()
        head.wait(timeout=60)


@pytest.mark.parametrize("launcher", ["slurm", "parallel"])
def test_the_launcher_options_ask_for_what_a_run_needs(launcher):
    """hydra/launcher=slurm and =parallel compose on submitit's configs, their resources following the trainer: one
    task (and GPU) per device of trainer.devices, on trainer.num_nodes nodes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from moe_lab.training.schemas import config_dir

    GlobalHydra.instance().clear()
    overrides = [f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    resolved = {k: OmegaConf.select(cfg, f"hydra.launcher.{k}") for k in ("gpus_per_node", "tasks_per_node", "nodes")}
    kind = "SlurmLauncher" if launcher == "slurm" else "LocalLauncher"
    assert launcher_cfg["_target_"].endswith(kind)
    assert resolved["gpus_per_node"] == 4
    if launcher == "slurm":
        assert resolved == {"gpus_per_node": 4, "tasks_per_node": 4, "nodes": 2}
        assert launcher_cfg["max_num_timeout"] == 3  # pre-empted or timed-out jobs are requeued and resume
        assert launcher_cfg["signal_delay_s"] == 120  # time to finish a step and save before the limit
    else:
        assert resolved["tasks_per_node"] == 1


def test_the_summary_and_page_are_rebuilt_from_the_job_folders_when_read(sweep_dir, tmp_path):
    """A sweep whose submitting process is gone (SLURM: hydra #3201) before it wrote the end of the sweep: `moe-lab
    dashboard SWEEP` rebuilds sweep_summary.csv, prints the ranked table and writes the page from the job folders."""
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(sweep_dir, sweep)
    want = read_summary(sweep)
    (sweep / "sweep_summary.csv").unlink()
    (sweep / "dashboard.html").unlink()
    result = run_cli(["dashboard", str(sweep)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    got = read_summary(sweep)
    key = lambda rows: [(r["job"], r["status"], r["val/loss"]) for r in rows]  # noqa: E731
    assert key(got) == key(want)
    assert (sweep / "dashboard.html").is_file()
    assert "val/loss" in result.stdout and f"wrote {sweep / 'sweep_summary.csv'}" in result.stdout


def test_jobs_in_folders_named_by_hydra_sweep_subdir_count_as_started(tmp_path):
    """hydra.sweep.subdir='${seed}' names job N's folder by its seed: the summary finds the job by the number Hydra
    saved in the folder (.hydra/hydra.yaml), so no started job is listed as not started, and one without a folder is."""
    from moe_lab.training.sweeps import job_folders, not_started_rows

    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}
    multirun = {"hydra": {"sweeper": sweeper, "overrides": {"task": ["seed=5,6,7"]}}}
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    for number, seed in ((0, 5), (1, 6)):
        (tmp_path / str(seed) / ".hydra").mkdir(parents=True)
        (tmp_path / str(seed) / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": number}}}))
    assert job_folders(tmp_path) == {0: tmp_path / "5", 1: tmp_path / "6"}
    assert not_started_rows(tmp_path) == [{"job": "2", "status": "not started", "overrides": "seed=7"}]


def _copied_sweep(sweep_dir: Path, tmp_path: Path) -> Path:
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(sweep_dir, sweep)
    return sweep


def _sweep_command(sweep: Path) -> list[str]:
    """The command that ran the sweep in the folder (its task overrides, from multirun.yaml), into `sweep`."""
    task = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["overrides"]["task"]
    return ["-m", *task, f"hydra.sweep.dir={sweep}"]


def test_a_sweep_folders_plan_is_bounded_and_compared_with_the_command(sweep_dir, tmp_path, capsys):
    """multirun.yaml asking for a billion jobs (hydra.sweeper.params: +x=range(0,1000000000)): the dashboard refuses
    it in one line without expanding it, and the command that ran the sweep does not take the folder's params as its
    own (the folder is not its sweep); a damaged multirun.yaml is named as damaged."""
    import signal

    from moe_lab.cli.main import main
    from moe_lab.cli.preflight import preflight

    sweep = _copied_sweep(sweep_dir, tmp_path)
    command = _sweep_command(sweep)
    multirun = yaml.safe_load((sweep / "multirun.yaml").read_text())
    multirun["hydra"]["sweeper"]["params"] = {"+x": "range(0,1000000000)"}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the folder's plan was expanded"))
    signal.alarm(60)
    try:
        assert main(["dashboard", str(sweep)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "plans more than 100,000 jobs" in err, err
        message = preflight(command)
    finally:
        signal.alarm(0)
    assert message is not None and "already holds runs of another command" in message, message
    (sweep / "multirun.yaml").write_text("hydra: {overrides: [\n")
    message = preflight(command)
    assert message is not None and "multirun.yaml is damaged" in message, message


def test_a_damaged_earlier_attempt_is_one_line_and_the_summary_stays_right(sweep_dir, tmp_path, capsys):
    """A finished job resumed from an attempt whose .hydra/overrides.yaml holds a python tag: the summary lists the job
    as finished (not 'not started'), and the sweep's end and the dashboard say so in one `moe-lab:` line each."""
    import shutil

    from omegaconf import OmegaConf

    from moe_lab.cli.hydra_callbacks import SweepSummary
    from moe_lab.cli.main import main

    sweep = _copied_sweep(sweep_dir, tmp_path)
    want = [(r["job"], r["status"]) for r in read_summary(sweep)]
    attempt = sweep / ".attempts" / "0-1"
    shutil.copytree(sweep / "0", attempt)
    (attempt / ".hydra" / "overrides.yaml").write_text("- !!python/object/apply:os.system ['touch ran']\n")
    (sweep / "0" / "resumed_from.json").write_text(json.dumps({"step": 3, "run_dir": str(attempt)}))
    (sweep / "sweep_summary.csv").unlink()
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"_target_": "BasicSweeper"}}, "metrics": {}}
    )
    SweepSummary().on_multirun_end(config)
    err = capsys.readouterr().err
    assert [(r["job"], r["status"]) for r in read_summary(sweep)] == want
    lines = said(err)
    assert len(lines) == 1 and "overrides.yaml is damaged" in lines[0] and "0 was resumed from" in lines[0], err
    assert main(["dashboard", str(sweep)]) == 0
    assert capsys.readouterr().err.count("overrides.yaml is damaged") == 1
    assert not (tmp_path / "ran").exists()


def test_a_job_folder_the_summary_cannot_read_is_one_error_line_at_the_end_of_the_sweep(sweep_dir, tmp_path, capsys):
    """Hydra turns a callback's exception into a Python warning and goes on (exit 0); moe-lab's end-of-sweep callback
    says what it could not read in one `moe-lab: error:` line and ends the command with exit code 1."""
    from omegaconf import OmegaConf

    from moe_lab.cli.hydra_callbacks import SweepSummary

    sweep = _copied_sweep(sweep_dir, tmp_path)
    (sweep / "2" / "summary.json").write_text("[1, 2")
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"_target_": "BasicSweeper"}}, "metrics": {}}
    )
    with pytest.raises(SystemExit) as stopped:
        SweepSummary().on_multirun_end(config)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moe-lab: error: the sweep summary could not be written: ")
    assert f"{sweep / '2' / 'summary.json'} is damaged" in err


@pytest.mark.parametrize(
    "task,planned",
    [
        (["seed=range(1,10,3)", "experts=e4,e8"], 6),  # a range counted by its arithmetic: 1, 4, 7
        (["seed=range(10,1,-4)"], 3),
        (["experts=glob(e*)"], None),  # listed by Hydra's config loader at run time: not known from the file
    ],
)
def test_a_plan_is_counted_before_it_is_listed(task, planned, tmp_path):
    from moe_lab.training.sweeps import planned_jobs

    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}
    multirun = {"hydra": {"sweeper": sweeper, "overrides": {"task": task}}}
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    jobs = planned_jobs(tmp_path)
    assert (len(jobs) if jobs is not None else None) == planned


def test_the_line_of_a_job_without_a_result_says_what_its_folder_knows(tmp_path):
    """What moe-lab's launchers print for a job that handed back no result: the step it stopped at when its run wrote
    a summary (SIGTERM, Ctrl-C), a kill when it wrote none, its log when its process raised outside the run."""
    from moe_lab.cli.launchers import stopped_job_line

    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": 0}}}))
    killed = stopped_job_line(tmp_path, 0, ["seed=2"], log="L")
    assert killed.startswith("moe-lab: job 0 (seed=2) did not finish: ended without a word (killed")
    assert killed.endswith("(its log: L)")
    raised = stopped_job_line(tmp_path, 0, ["seed=2"], log="L", raised=True)
    assert "its process failed outside the run (the error is in its log)" in raised and raised.endswith("(its log: L)")
    (job / "summary.json").write_text(json.dumps({"status": "interrupted", "step": 18}))
    interrupted = stopped_job_line(tmp_path, 0, ["seed=2"])
    assert "did not finish: interrupted at step 18; the same command again continues it" in interrupted


def test_each_command_gets_a_submitit_folder_of_its_own(tmp_path):
    """The folder submitit's pickles pass through is made new (never one that exists, which a handed folder could
    fill), where submitit's per-job part of the pattern begins; a pattern without one gets the new folder itself."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from moe_lab.cli.submitit_launcher import fresh_submitit_folder

    old = tmp_path / "sweep" / ".submitit"
    (old / "123").mkdir(parents=True)
    (old / "123" / "123_0_result.pkl").write_bytes(b"planted")
    first, second = (Path(fresh_submitit_folder(f"{old}/%j")) for _ in range(2))
    assert first.name == second.name == "%j" and first.parent != second.parent
    assert first.parent.parent == old and not any(first.parent.iterdir())
    plain = Path(fresh_submitit_folder(str(tmp_path / "logs")))
    assert plain.parent == tmp_path / "logs" and plain.is_dir() and not any(plain.iterdir())
