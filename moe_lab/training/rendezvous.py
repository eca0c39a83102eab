"""The start of a run of several processes: who may start one, and the rendezvous of its ranks, which ends in one line
(never a hang) when they do not all arrive in time or a stop signal comes while they wait.

A rank waiting for the others sits in torch.distributed's C++ code (the TCP store, gloo's connect), and Python runs a
signal's handler only when the main thread is back in Python: Ctrl-C and SIGTERM would wait with it. So while the
ranks meet, a watching thread keeps the clock and learns of the stop signals through Python's wakeup file descriptor
(`signal.set_wakeup_fd`, written by the C-level handler whichever thread the signal reaches); when either ends the
wait, it says so, gives back the run directory (nothing of a run was written) and ends the process and the ranks
Lightning started beside it.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from moe_lab.errors import ConfigError

# The variables by which a process knows it was started as one rank of several (by torchrun, srun, mpirun, a
# Kubernetes operator or by hand as Lightning documents: NODE_RANK with MASTER_ADDR on each node).
LAUNCHER_VARIABLES = (
    "TORCHELASTIC_RUN_ID",  # torchrun
    "LOCAL_RANK",  # torchrun, Lightning's own launcher, anything that starts the ranks itself
    "NODE_RANK",  # one command per node, started by hand
    "GROUP_RANK",
    "SLURM_NTASKS",  # srun
    "LSB_JOBID",  # LSF's jsrun
    "OMPI_COMM_WORLD_SIZE",  # mpirun
    "PMI_SIZE",
    "WORLD_SIZE",  # the Kubeflow PyTorch operator, and by hand
)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def started_by_a_launcher() -> bool:
    """Whether something that starts every node's processes started this one."""
    return any(variable in os.environ for variable in LAUNCHER_VARIABLES)


def check_launch(trainer: dict) -> None:
    """ConfigError for `trainer.num_nodes > 1` in a process no launcher started: it would wait forever for the nodes
    that nobody starts."""
    nodes = trainer.get("num_nodes", 1)
    if not isinstance(nodes, int) or nodes <= 1 or started_by_a_launcher():
        return
    devices = trainer.get("devices", 1)
    raise ConfigError(
        f"trainer.num_nodes={nodes} runs one command on each of {nodes} nodes, and each must be started there by "
        f"torchrun (torchrun --nnodes={nodes} --nproc-per-node={devices} --rdzv-endpoint=HEAD:29500 $(which moe-lab) "
        "train ...) or by srun in a SLURM job (see the README's 'Several nodes'); started alone here it would wait "
        "for the other nodes forever. On this machine only, drop trainer.num_nodes"
    )


class RendezvousWatch:
    """Ends the process in one line when the ranks have not all met after `timeout_s`, or when Ctrl-C or SIGTERM
    comes while they wait. `give_up(line, exit_code)` does what must be done before the process ends (say the line,
    give back the run directory, stop the ranks started beside this one). `signals` is the read end of the pipe that
    Python's C-level signal handler writes each signal's number to (`signal.set_wakeup_fd`), whichever thread the
    signal reached."""

    def __init__(self, timeout_s: float, waiting_for: str, give_up: Callable[[str, int], None], signals: int):
        self.timeout_s = timeout_s
        self.waiting_for = waiting_for
        self.give_up = give_up
        self.signals = signals
        self.met = threading.Event()

    def watch(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.met.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                self.give_up(
                    f"moe-lab: error: {self.waiting_for} did not all start within rendezvous_timeout_s="
                    f"{self.timeout_s:g} s, so the run ended before it began (nothing was trained or written). Start "
                    "the same command on every node (torchrun or srun), check that each reaches the head's address "
                    "and port, or wait longer with rendezvous_timeout_s=...",
                    1,
                )
                return
            ready, _, _ = select.select([self.signals], [], [], min(left, 0.2))
            caught = [n for n in os.read(self.signals, 64) if n in STOP_SIGNALS] if ready else []
            if caught and not self.met.is_set():  # once the ranks have met, the run's own handler takes it
                name = signal.Signals(caught[0]).name
                self.give_up(
                    f"moe-lab: {name} while waiting for {self.waiting_for}: the run ended before it began (nothing "
                    "was trained or written)",
                    128 + caught[0],
                )
                return


@contextmanager
def watched_rendezvous(timeout_s: float, waiting_for: str, give_up: Callable[[str, int], None]) -> Iterator[None]:
    """Run the body (the ranks meeting, in the main thread) under a RendezvousWatch."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    in_main = threading.current_thread() is threading.main_thread()  # only the main thread may set the wakeup fd
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False) if in_main else None
    watch = RendezvousWatch(timeout_s, waiting_for, give_up, read_end)
    thread = threading.Thread(target=watch.watch, name="moe-lab-rendezvous", daemon=True)
    thread.start()
    try:
        yield
    finally:
        watch.met.set()
        thread.join()
        if in_main and previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)


def end_process(line: str, exit_code: int, children: list, run_dir: Optional[Path], speaks: bool) -> None:
    """Say `line` (from the rank that speaks for this node), give back `run_dir` (rank 0: nothing of a run was written
    in it), stop the ranks Lightning started beside this process, then end it at once: the main thread is held in C++
    code that nothing else would interrupt."""
    from moe_lab.training.run_dir import release_run_dir

    if speaks:
        print(line, file=sys.stderr, flush=True)
    if run_dir is not None:
        release_run_dir(run_dir)
    for child in children:
        try:
            child.kill()
        except OSError:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
