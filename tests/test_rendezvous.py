"""The start of a run of several processes never hangs: `trainer.num_nodes > 1` with no launcher is refused before any
work, a rendezvous the other ranks never join ends in one line after `rendezvous_timeout_s` (a real gloo rendezvous on
127.0.0.1), a stop signal while the ranks wait ends the run at once, and either gives the run directory back; a
directory whose claimant was killed (kill -9) is not left claimed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_lab.training.rendezvous import LAUNCHER_VARIABLES
from moe_lab.training.run_dir import CLAIM, claim_run_dir, claimed_by_this_process, refuse_used_run_dir

from conftest import FAST, free_port, moe_lab_script

TWO_NODES = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2", *FAST]


def no_launcher() -> dict[str, str]:
    """This environment as a login shell has it: nothing says a launcher started the process."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}


def test_several_nodes_without_a_launcher_are_refused_before_any_work(tmp_path, cache_dir):
    run = tmp_path / "run"
    env = {**no_launcher(), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [moe_lab_script(), "train", *TWO_NODES, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("moe-lab: error:")]
    assert len(errors) == 1 and "trainer.num_nodes=2" in errors[0] and "torchrun" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not run.exists()


def start_node_zero(tmp_path: Path, cache_dir: Path, timeout_s: float) -> tuple[subprocess.Popen, Path]:
    """Node 0 of 2, started by hand as Lightning documents (NODE_RANK, MASTER_ADDR, MASTER_PORT), whose node 1
    never comes: Lightning starts its second process, and both wait for ranks 2 and 3."""
    run = tmp_path / "run"
    env = {
        **no_launcher(),
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [moe_lab_script(), "train", *TWO_NODES, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"]
    command.append(f"rendezvous_timeout_s={timeout_s}")
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    return proc, run


def assert_ended_and_given_back(proc: subprocess.Popen, stderr: str, run: Path) -> None:
    assert "Traceback" not in stderr, stderr
    assert not (run / CLAIM).exists() and not (run / ".hydra").exists(), sorted(p.name for p in run.iterdir())
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run}"], capture_output=True, text=True).stdout.split()
    assert left == [], "a rank Lightning started was left waiting"


def test_a_rendezvous_the_other_nodes_never_join_ends_in_one_line(tmp_path, cache_dir):
    proc, run = start_node_zero(tmp_path, cache_dir, timeout_s=3)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("moe-lab: error:")]
    assert len(errors) == 1 and "rendezvous_timeout_s=3 s" in errors[0], stderr
    assert "waiting up to 3 s for the 4 processes" in stderr
    assert_ended_and_given_back(proc, stderr, run)


def test_sigterm_while_the_ranks_wait_ends_the_run(tmp_path, cache_dir):
    proc, run = start_node_zero(tmp_path, cache_dir, timeout_s=300)
    lines = []
    for line in proc.stderr:  # until the process waits for the other node
        lines.append(line)
        if "Initializing distributed: GLOBAL_RANK: 0" in line:
            break
    time.sleep(2)  # inside gloo's connect (C++), where Python's own handlers would not run
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    stderr = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "moe-lab: SIGTERM while waiting for the 4 processes" in stderr
    assert_ended_and_given_back(proc, stderr, run)


def test_a_claim_whose_process_was_killed_is_taken_over(tmp_path):
    run = tmp_path / "run"
    killed = subprocess.Popen(
        [sys.executable, "-c", f"from moe_lab.training.run_dir import claim_run_dir; claim_run_dir({str(run)!r})"]
    )
    killed.wait()  # it claimed the directory and ended without giving it back (as kill -9 leaves it)
    (run / ".hydra").mkdir()
    assert (run / CLAIM).exists()
    refuse_used_run_dir(run, hydra_made=True)  # not a run: no refusal
    claim_run_dir(run, hydra_made=True)
    assert claimed_by_this_process(run) and not (run / ".hydra").exists()


def test_a_claim_of_a_live_process_or_of_a_run_with_results_stays(tmp_path):
    import pytest

    from moe_lab.errors import UserError

    live = tmp_path / "live"
    live.mkdir()
    (live / CLAIM).write_text(f"{os.getppid()} {os.uname().nodename}\n")
    with pytest.raises(UserError, match="already holds a run"):
        refuse_used_run_dir(live)
    ended = tmp_path / "ended"
    subprocess.run(
        [sys.executable, "-c", f"from moe_lab.training.run_dir import claim_run_dir; claim_run_dir({str(ended)!r})"],
        check=True,
    )
    (ended / "metrics.csv").write_text("step\n")
    with pytest.raises(UserError, match="already holds a run"):
        claim_run_dir(ended)


def test_more_processes_than_cpus_is_said_once_and_the_ranks_speak_once(tmp_path, cache_dir):
    """2 processes pinned to 1 CPU: the header says what it costs, once; what every rank would print (Lightning's
    lines, the data line, warnings) reaches the terminal once, from rank 0."""
    result = subprocess.run(
        [
            moe_lab_script(),
            "train",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            *FAST,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env={**no_launcher(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    crowded = [line for line in lines if "starts 2 processes on 1 CPUs" in line]
    assert len(crowded) == 1 and crowded[0].startswith("moe-lab: warning:"), lines
    assert sum("Initializing distributed" in line for line in lines) == 1, lines
    assert sum("validation blocks of" in line for line in lines) <= 1, lines
    warned = [line for line in lines if "Warning" in line]
    assert len(warned) == len(set(warned)), warned


def test_the_watch_keeps_its_clock_outside_the_main_thread():
    """Some launchers run a job in a thread of their own, where Python lets no one set the wakeup fd: the rendezvous
    is still timed there (the signals are the launcher's)."""
    import threading

    from moe_lab.training.rendezvous import watched_rendezvous

    said = []

    def job():
        with watched_rendezvous(0.3, "the 2 processes", lambda line, code: said.append((line, code))):
            time.sleep(1.0)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    assert len(said) == 1 and said[0][1] == 1 and "rendezvous_timeout_s=0.3 s" in said[0][0]


def test_a_stop_signal_that_reached_another_rank_stops_this_one_at_the_same_point():
    """SLURM pre-empts one node's tasks: the ranks that got no signal learn of it from the others (a max over ranks),
    in the untrained model's validation and at each optimizer step, so no rank is left waiting in a collective."""
    from types import SimpleNamespace

    import torch

    from moe_lab.training.callbacks import GracefulStop, StopRequested

    def trainer(others: int, world: int = 2, step: int = 0):
        reduce = lambda flag, reduce_op: torch.maximum(flag, torch.tensor([others]))  # noqa: E731
        return SimpleNamespace(
            world_size=world,
            training=False,
            global_step=step,
            state=SimpleNamespace(fn="validate"),
            strategy=SimpleNamespace(root_device="cpu", reduce=reduce),
        )

    stop = GracefulStop("unused.ckpt")
    stop.on_validation_batch_end(trainer(others=0))  # nobody was signalled: validation goes on
    with pytest.raises(StopRequested) as caught:
        stop.on_validation_batch_end(trainer(others=signal.SIGTERM))
    assert caught.value.signum == signal.SIGTERM and stop.received == signal.SIGTERM
    alone = GracefulStop("unused.ckpt")
    assert alone.agreed(trainer(others=signal.SIGTERM, world=1)) is None  # one process: nothing to learn from
