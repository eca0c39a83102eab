"""Shared fixtures: compose the real `conf/train.yaml` with small, fast settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from moe_lab.training.schemas import config_dir

REPO = Path(__file__).resolve().parents[1]

# Small enough that a training step takes tens of milliseconds on one CPU core.
FAST = [
    "model.d_model=64",
    "model.n_heads=2",
    "model.ffn_hidden=128",
    "model.n_layers=2",
    "model.max_seq_len=128",
    "data.seq_len=64",
    "data.batch_size=8",
    "++data.max_chars_per_domain=30000",
    "data.max_val_blocks=16",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=3",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "checkpoint.every_n_steps=6",
    # float32 eager, whatever the CPU: the tests compare exact numbers (the loop oracle, resumes, parallel layouts);
    # the bfloat16 compiled default of CPUs with AMX has tests of its own (test_compile.py).
    "trainer.precision=32-true",
    "compile=false",
]


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenised-data cache for the whole session (as users get one across runs)."""
    return tmp_path_factory.mktemp("cache")


def compose_cfg(overrides: list[str], output_dir: Path | None = None, cache: Path | None = None, fast: bool = True):
    """The config `moe-lab train OVERRIDES` would run, with outputs in `output_dir`."""
    extra = list(FAST) if fast else []
    if output_dir is not None:
        extra.append(f"paths.output_dir={output_dir}")
    if cache is not None:
        extra.append(f"paths.cache_dir={cache}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=extra + list(overrides))
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    def make(*overrides: str, name: str = "run", fast: bool = True):
        return compose_cfg(list(overrides), output_dir=tmp_path / name, cache=cache_dir, fast=fast)

    return make


@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory, cache_dir) -> Path:
    """A checkpoint of a real 3-step run (dropless), for the tests that read, damage or doctor one (on copies)."""
    from moe_lab.training.train import train

    root = tmp_path_factory.mktemp("real")
    train(
        compose_cfg(
            ["trainer.max_steps=3", "capacity=dropless", "metrics.dashboard=false"],
            output_dir=root / "run",
            cache=cache_dir,
        )
    )
    return root / "run" / "checkpoints" / "last.ckpt"


def router_options() -> list[str]:
    """Every option of `router=`: the conf/router/*.yaml files and the registered routers without one."""
    from moe_lab.model.router_configs import registered_routers

    return sorted({p.stem for p in (Path(config_dir()) / "router").glob("*.yaml")} | set(registered_routers()))


def router_partners(option: str) -> list[str]:
    """The overrides `router=OPTION` needs beside it, from its capability flags: aux_loss=none for a router with
    no learned gate (no router loss applies to it), unless its option brings it (its Config's brings_aux_loss)."""
    from moe_lab.model.router_configs import registered_routers

    moe = compose_cfg([f"router={option}"], fast=False).model.moe
    weighted = any(float(weight) > 0 for weight in moe.aux_loss.values())
    return ["aux_loss=none"] if weighted and not registered_routers()[moe.router.name].has_gate else []


def moe_lab_script() -> str:
    """The installed console script (the same environment as the tests)."""
    script = Path(sys.executable).parent / "moe-lab"
    if not script.exists():
        pytest.skip("moe-lab is not installed in this environment (pip install -e '.[test]')")
    return str(script)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous of test processes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def said(text: str) -> list[str]:
    """moe-lab's own lines in `text` (a command's stderr), without its warning about the machine's load: that says
    what else the machine runs (another test beside this one), not what the command did."""
    lines = [line for line in text.splitlines() if line.startswith("moe-lab:")]
    return [line for line in lines if not line.startswith("moe-lab: warning: the machine's load is")]


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}  # never a developer's real key
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", ""), **(env_extra or {})})
    return subprocess.run([moe_lab_script(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory, cache_dir) -> Path:
    """A 4-job sweep run by the installed script, as the issue's `moe-lab train -m experts=e4,e8 ...` (shared by the
    sweep and dashboard tests; slow)."""
    root = tmp_path_factory.mktemp("sweep")
    sweep = root / "sweep"
    result = run_cli(
        [
            "train",
            "-m",
            "experts=e4,e8",
            "aux_loss=none,switch",
            *FAST,
            f"paths.cache_dir={cache_dir}",
            "trainer.max_steps=9",
            "trainer.val_check_interval=9",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "stdout.txt").write_text(result.stdout)  # what the sweep printed, for the tests that read it
    return sweep


def chromium() -> str | None:
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def assert_causal(model, batch: int, seq: int, t: int, vocab: int = 64) -> None:
    """Changing token t never changes the logits before t, and does change some logit at or after t."""
    ids = torch.randint(0, vocab, (batch, seq))
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 7) % vocab
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-5


def tiny_moe_model(router: dict, num_experts: int = 4, seed: int = 0, **moe):
    """A 2-layer MoE transformer of width 32 over a vocabulary of 64, in eval mode, its weights from `seed`: the model
    the routing-replay and pruning tests build with each router."""
    import torch

    from moe_lab.model import ModelConfig, MoEConfig, MoETransformer

    torch.manual_seed(seed)
    experts = MoEConfig(num_experts=num_experts, expert_hidden=32, router=router, **moe)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=64, moe=experts)
    return MoETransformer(cfg).eval()
