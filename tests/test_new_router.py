"""Adding a router is one place: its settings and its module, here in a throwaway module of a package of its own.

The package is found through its `moe_lab.routers` entry point (a dist-info folder on PYTHONPATH, as `pip install`
writes one), and no file of moe-lab is touched: the router composes as `router=NAME`, appears in
`moe-lab train --help`, trains from the command line, and computes the same run under expert parallelism as without.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, moe_lab_script

pytestmark = pytest.mark.slow

NAME = "lowest_score"
ROUTER_MODULE = '''
from dataclasses import dataclass

from moe_lab.model.router_configs import RouterConfig
from moe_lab.model.routers import Router, Routing


@dataclass
class LowestScoreConfig(RouterConfig):
    name: str = "lowest_score"
    # Renormalise the k chosen weights to sum to 1.
    normalize: bool = True
    summary = "the k experts a softmax gate likes least (a throwaway router of moe-lab's tests)"


class LowestScoreRouter(Router):
    """Sends each token to the k experts of lowest softmax score: a router no paper proposes (written 2026 for a
    test), so that nothing in moe-lab can know it."""

    Config = LowestScoreConfig

    def forward(self, inputs):
        logits_TE = self.gate_logits(inputs.x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        expert_ids_TK = (-probs_TE).topk(self.top_k, dim=-1).indices
        weights_TK = probs_TE.gather(1, expert_ids_TK)
        if self.cfg.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return Routing.from_token_choice(expert_ids_TK, weights_TK, self.num_experts, probs_TE=probs_TE,
                                         logits_TE=logits_TE)
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """An environment in which the throwaway router's package is installed (importable, with its entry point)."""
    site = tmp_path_factory.mktemp("site")
    (site / "throwaway_router.py").write_text(ROUTER_MODULE)
    info = site / "throwaway_router-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-router\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[moe_lab.routers]\nlowest_score = throwaway_router\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("WANDB_API_KEY", None)
    return env


def test_no_file_of_moe_lab_names_the_router():
    for folder in ("moe_lab", "conf"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".yaml", ".j2"):
                assert NAME not in path.read_text(), path


def test_it_appears_in_help_and_trains_from_the_command_line(plugin_env, tmp_path, cache_dir):
    script = moe_lab_script()
    shown = subprocess.run([script, "train", "--help"], env=plugin_env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    router_line = next(line for line in shown.stdout.splitlines() if line.startswith("router:"))
    assert NAME in router_line.split(":")[1].replace(",", " ").split()
    run_dir = tmp_path / "run"
    trained = subprocess.run(
        [
            script,
            "train",
            f"router={NAME}",
            "model.moe.router.normalize=false",
            *FAST,
            "trainer.max_steps=6",
            "metrics.dashboard=false",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={run_dir}",
        ],
        env=plugin_env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"({NAME})" in trained.stdout  # the run's header names the router
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val/loss"] < summary["initial_val_loss"]
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert f"name: {NAME}" in saved and "normalize: false" in saved


def test_it_runs_under_expert_parallelism_with_the_same_math(plugin_env, tmp_path, cache_dir):
    """2 gloo ranks, experts split over them (expert_parallel=2) or replicated (1): the same losses, bit for bit
    (trainer.deterministic=true), as tests/test_distributed.py holds every built-in router."""
    common = [
        *FAST,
        f"router={NAME}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.deterministic=true",
        "data.batch_size=4",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "metrics.dashboard=false",
        "threads=1",
        f"paths.cache_dir={cache_dir}",
    ]
    plan = [
        {"dir": str(tmp_path / f"ep{ep}"), "overrides": [*common, f"model.moe.expert_parallel={ep}"]} for ep in (1, 2)
    ]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(REPO / "tests" / "layout_worker.py"),
            str(tmp_path / "plan.json"),
        ],
        env=plugin_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summaries = [json.loads((tmp_path / f"ep{ep}" / "summary.json").read_text()) for ep in (1, 2)]
    assert summaries[0]["val/loss"] == summaries[1]["val/loss"]
    curves = [(tmp_path / f"ep{ep}" / "metrics.csv").read_text().splitlines() for ep in (1, 2)]
    loss_column = curves[0][0].split(",").index("train/loss")
    losses = [[row.split(",")[loss_column] for row in curve[1:] if row.split(",")[loss_column]] for curve in curves]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert Path(tmp_path / "ep2" / "checkpoints" / "last.ckpt").exists()


def test_a_plugin_that_fails_to_import_is_one_error_line(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_router.py").write_text("raise RuntimeError('half-written router')\n")
    info = site / "broken_router-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-router\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[moe_lab.routers]\nbroken = broken_router\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [moe_lab_script(), "train", f"hydra.run.dir={tmp_path / 'run'}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("moe-lab: error: the router plugin 'broken'") and "half-written router" in lines[0]
    assert not (tmp_path / "run").exists()
