"""Several nodes, on 127.0.0.1 with gloo: 2 nodes x 2 processes, started as the README says (torchrun on each node,
or SLURM's variables as srun sets them), train the same model as 1 process accumulating the same 4 micro-batches,
with expert-parallel groups inside a node (ranks 0-1 and 2-3) and data parallelism across the nodes.

Four ranks sum their gradients in another order than one process accumulates them, so the two agree up to float
rounding (the 2-rank tests in test_distributed.py hold bit for bit, where a + b has one order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import COMMON, STEPS, TOL, assert_same_curves, assert_same_final_state, finish, run_plan

from moe_lab.training.checkpoint import read_checkpoint

from conftest import FAST, REPO, free_port, moe_lab_script

pytestmark = pytest.mark.slow

NODES, PER_NODE = 2, 2
RANKS = NODES * PER_NODE
LAYOUT = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    f"trainer.devices={PER_NODE}",
    f"trainer.num_nodes={NODES}",
    "model.moe.expert_parallel=2",
]
ONE = ["data.batch_size=4", f"trainer.accumulate_grad_batches={RANKS}", f"trainer.val_check_interval={RANKS * STEPS}"]


def worker_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_API_KEY", None)
    return env


def torchrun_nodes(plan: Path, port: int) -> list[subprocess.Popen]:
    """One torchrun per node, as on a cluster: the same command, its own --node-rank, the head's address."""
    procs = []
    for node in range(NODES):
        command = [
            *(sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", f"--nproc-per-node={PER_NODE}"),
            *(f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}"),
            *(str(REPO / "tests" / "layout_worker.py"), str(plan)),
        ]
        log = open(plan.with_name(f"node{node}.log"), "w")
        procs.append(subprocess.Popen(command, cwd=plan.parent, env=worker_env(), stdout=log, stderr=subprocess.STDOUT))
    return procs


def srun_tasks(plan: Path, port: int) -> list[subprocess.Popen]:
    """The 4 tasks of `srun` on 2 nodes of 2 tasks each: one plain process per rank with SLURM's variables."""
    return srun([sys.executable, str(REPO / "tests" / "layout_worker.py"), str(plan)], plan.parent, port)


def srun(command: list[str], folder: Path, port: int) -> list[subprocess.Popen]:
    """`command` started as srun starts the tasks of a 2-node job, each with its log `task{rank}.log` in `folder`."""
    procs = []
    for rank in range(RANKS):
        env = {
            **worker_env(),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "moe-lab",  # not "bash": Lightning takes an interactive allocation for no SLURM job
            "SLURM_NTASKS": str(RANKS),
            "SLURM_NTASKS_PER_NODE": str(PER_NODE),
            "SLURM_NNODES": str(NODES),
            "SLURM_NODELIST": "127.0.0.1",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % PER_NODE),
            "SLURM_NODEID": str(rank // PER_NODE),
            "MASTER_PORT": str(port),
        }
        log = open(folder / f"task{rank}.log", "w")
        procs.append(subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> Path:
    root = tmp_path_factory.mktemp("nodes")
    common = [*COMMON, f"paths.cache_dir={cache_dir}"]
    launched = []
    for name, launch in (("torchrun", torchrun_nodes), ("srun", srun_tasks)):
        plan = root / name / "plan.json"
        plan.parent.mkdir()
        overrides = [
            *common,
            *LAYOUT,
            "trainer.deterministic=true",
            "data.batch_size=4",
            f"trainer.val_check_interval={STEPS}",
        ]
        plan.write_text(json.dumps([{"dir": str(root / name / "run"), "overrides": overrides}]))
        launched += [(proc, plan.parent) for proc in launch(plan, free_port())]
    one = run_plan([{"dir": str(root / "one"), "overrides": [*common, *ONE]}], root / "one.json", ranks=1)
    for proc, folder in launched:
        finish(proc, next(folder.glob("*.log")))
    finish(one, root / "one.log")
    return root


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_two_nodes_of_two_processes_train_as_one_process_accumulating_four_micro_batches(runs, launcher):
    run = runs / launcher / "run"
    assert_same_curves(run, runs / "one", tol=TOL)
    assert_same_final_state(run, runs / "one", rel=1e-3)
    # Lightning's line once every rank has joined the process group (rank 0 says it; the other ranks keep their
    # information lines off the terminal)
    logs = "".join(p.read_text() for p in (runs / launcher).glob("*.log"))
    assert f"All distributed processes registered. Starting with {RANKS} processes" in logs, logs[-3000:]
    assert "GLOBAL_RANK: 1," not in logs  # said once, by rank 0, not by every rank


def task_logs(folder: Path) -> str:
    """The last lines of every task's log."""
    return "\n".join(f"--- task {rank}\n" + (folder / f"task{rank}.log").read_text()[-3000:] for rank in range(RANKS))


def test_pre_empting_one_node_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path, cache_dir):
    """SLURM pre-empts the tasks of one node (SIGTERM to ranks 2 and 3): the ranks agree on the step to stop at, the
    run saves one last.ckpt there, and every task exits 128 + SIGTERM (the command, started on every rank as the
    README says)."""
    import signal
    import time

    run = tmp_path / "run"
    command = [
        *(moe_lab_script(), "train", *FAST, f"paths.cache_dir={cache_dir}", *LAYOUT),
        *("data.batch_size=4", "trainer.max_steps=100000", "trainer.val_check_interval=100000"),
        *("checkpoint.every_n_steps=100000", "trainer.log_every_n_steps=2", "threads=1", f"hydra.run.dir={run}"),
    ]
    tasks = srun(command, tmp_path, free_port())
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(t.poll() is None for t in tasks):  # until some steps are logged
            if (run / "routing.jsonl").exists():
                break
            time.sleep(0.2)
        for task in tasks[PER_NODE:]:  # the second node's tasks
            task.send_signal(signal.SIGTERM)
        try:
            codes = [task.wait(timeout=300) for task in tasks]
        except subprocess.TimeoutExpired:
            pytest.fail(f"a task did not end: {[t.poll() for t in tasks]}\n{task_logs(tmp_path)}")
    finally:
        for task in tasks:
            task.kill()
    logs = task_logs(tmp_path)
    assert codes == [128 + signal.SIGTERM] * RANKS, (codes, logs)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    stopped_at = json.loads((run / "summary.json").read_text())["step"]
    assert stopped_at > 0
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == stopped_at
