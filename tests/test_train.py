"""`train(cfg)` end to end in-process: metrics on disk, loss going down, exact resume, run-directory safety."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from moe_lab.analysis.pages import write_dashboard
from moe_lab.analysis.runs import read_run
from moe_lab.errors import UserError
from moe_lab.training.train import train

from conftest import router_options, router_partners


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def series(rows, key) -> dict[int, float]:
    return {int(r["step"]): r[key] for r in rows if key in r}


def test_train_writes_metrics_checkpoints_and_summary(make_cfg, tmp_path):
    summary = train(make_cfg(name="run"))
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "step000006.ckpt").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    rows = read_metrics(run_dir)
    val = series(rows, "val/loss")
    assert sorted(val) == [0, 6, 12]  # before training, every val_check_interval, and at the end
    assert val[12] < val[0] - 0.5
    assert summary["val/loss"] == pytest.approx(val[12]) and summary["initial_val_loss"] == pytest.approx(val[0])
    assert summary["val/ppl"] == pytest.approx(math.exp(val[12]))
    train_loss = series(rows, "train/loss")
    assert sorted(train_loss) == [3, 6, 9, 12] and train_loss[12] < train_loss[3]
    last = [r for r in rows if "train/loss" in r][-1]
    for key in (
        "train/aux/load_balance",
        "train/aux/z_loss",
        "train/tokens_per_sec",
        "train/lr",
        "val/loss/code",
        "val/loss/math",
    ):
        assert key in last or key in rows[-1], key
    for layer in (0, 1):
        loads = [last[f"moe/layer{layer}/expert{e}/load"] for e in range(8)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-5)
        assert last[f"moe/layer{layer}/imbalance"] == pytest.approx(max(loads) * 8, rel=1e-5)
        assert 0 <= last[f"moe/layer{layer}/dropped_frac"] < 1
        assert 0 < last[f"moe/layer{layer}/entropy"] <= math.log(8) + 1e-6


def test_dense_baseline_trains(make_cfg, tmp_path):
    summary = train(make_cfg("experts=dense", name="dense"))
    assert summary["val/loss"] < summary["initial_val_loss"]
    header = (tmp_path / "dense" / "metrics.csv").read_text().splitlines()[0]
    assert "moe/" not in header and "train/aux" not in header


def test_resume_continues_the_same_loss_curve(make_cfg, tmp_path):
    common = ["trainer.log_every_n_steps=1", "trainer.max_steps=8", "checkpoint.every_n_steps=4", "checkpoint.keep=-1"]
    train(make_cfg(*common, name="full"))
    train(make_cfg(*common, f"ckpt_path={tmp_path / 'full' / 'checkpoints' / 'step000004.ckpt'}", name="resumed"))
    full = series(read_metrics(tmp_path / "full"), "train/loss")
    resumed = series(read_metrics(tmp_path / "resumed"), "train/loss")
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == full[step], step  # step for step, bit for bit on CPU
    final_full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    final_resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name in final_full:
        assert torch.equal(final_full[name], final_resumed[name]), name
    # The final periodic checkpoint is the final checkpoint: last.ckpt links to it instead of copying it.
    last = tmp_path / "full" / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (tmp_path / "full" / "checkpoints" / "step000008.ckpt").resolve()
    # The resumed run's own files start at step 5; its dashboard data starts at step 0, from the run it continues.
    record = read_run(tmp_path / "resumed")
    steps, losses = record.series("train/loss")
    assert steps == list(range(1, 9)) and losses == [full[s] for s in steps]
    assert record.series("val/loss")[0][0] == 0 and record.earlier == [(tmp_path / "full", 4)]
    assert [r["step"] for r in record.routing] == list(range(1, 9))
    assert (
        record.summary["initial_val_loss"]
        == json.loads((tmp_path / "full" / "summary.json").read_text())["initial_val_loss"]
    )
    page = write_dashboard(tmp_path / "resumed").read_text()
    assert "resumed: the curves start in the runs it continues" in page


def test_resuming_a_finished_run_says_there_is_nothing_to_do(make_cfg, tmp_path):
    train(make_cfg("trainer.max_steps=2", name="done"))
    ckpt = tmp_path / "done" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="nothing to do: .* is at step 2 and trainer.max_steps=2.*trainer.max_steps=4"):
        train(make_cfg("trainer.max_steps=2", f"ckpt_path={ckpt}", name="again"))
    assert not (tmp_path / "again").exists()


def test_a_resumed_run_whose_first_run_is_gone_says_so(make_cfg, tmp_path):
    import shutil

    train(make_cfg("trainer.max_steps=2", name="first"))
    kept = tmp_path / "kept.ckpt"
    shutil.copy(tmp_path / "first" / "checkpoints" / "last.ckpt", kept)
    shutil.rmtree(tmp_path / "first")
    train(make_cfg("trainer.max_steps=4", f"ckpt_path={kept}", name="second"))
    record = read_run(tmp_path / "second")
    assert record.earlier == [] and "steps 0-2 were trained by" in record.gap and "gone" in record.gap
    assert record.series("train/loss")[0][0] == 3


def test_resume_inherits_the_overrides_saved_in_the_checkpoint(make_cfg, tmp_path, monkeypatch):
    from moe_lab.cli.inherited import with_checkpoint_overrides
    from moe_lab.training import train as train_module
    from moe_lab.training.checkpoint import saved as is_saved

    saved = ["experts=e4", "trainer.max_steps=2", "+trainer.deterministic=true", "hydra.run.dir=somewhere"]
    monkeypatch.setattr(train_module, "command_line_overrides", lambda: [o for o in saved if is_saved(o)])
    train(make_cfg("experts=e4", "trainer.max_steps=2", name="first"))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    args = with_checkpoint_overrides(["-m", f"ckpt_path={ckpt}", "trainer.max_steps=6", "seed=3"])
    assert args == [
        "-m",
        "experts=e4",
        "++trainer.deterministic=true",  # saved as `+` when the key was new: the same value now that it has one
        f"ckpt_path={ckpt}",
        "trainer.max_steps=6",
        "seed=3",
    ]
    assert with_checkpoint_overrides(["experts=e8"]) == ["experts=e8"]  # not a resume: untouched
    # A checkpoint from before overrides were saved: the .hydra/overrides.yaml of the run that holds it.
    loaded = torch.load(ckpt, weights_only=True)
    del loaded["moe_lab_run"]
    torch.save(loaded, ckpt)
    (tmp_path / "first" / ".hydra").mkdir()
    (tmp_path / "first" / ".hydra" / "overrides.yaml").write_text("- experts=e4\n- ckpt_path=x\n")
    assert with_checkpoint_overrides([f"ckpt_path={ckpt}"]) == ["experts=e4", f"ckpt_path={ckpt}"]


def test_a_used_run_directory_is_never_overwritten(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_text("precious")
    with pytest.raises(UserError, match="already holds a run"):
        train(make_cfg(name="run"))
    assert (run_dir / "checkpoints" / "last.ckpt").read_text() == "precious"


def test_resume_with_a_different_model_is_refused(make_cfg, tmp_path):
    train(make_cfg("trainer.max_steps=2", name="small"))
    ckpt = tmp_path / "small" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="model.moe.num_experts is 8 in the checkpoint but 4 here"):
        train(make_cfg("experts=e4", f"ckpt_path={ckpt}", name="other"))
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("option", router_options())
def test_every_router_trains(make_cfg, tmp_path, option):
    extra = router_partners(option)
    summary = train(
        make_cfg(f"router={option}", *extra, "trainer.max_steps=6", "trainer.val_check_interval=6", name=option)
    )
    assert summary["val/loss"] < summary["initial_val_loss"]
    header = (tmp_path / option / "metrics.csv").read_text().splitlines()[0]
    assert "moe/layer0/expert0/load" in header and "moe/layer1/imbalance" in header


def test_aux_free_bias_moves_once_per_optimizer_step_under_accumulation(make_cfg, tmp_path, monkeypatch):
    from moe_lab.model.routers import AuxFreeRouter

    seen = []  # the routed slots each bias update was computed from
    original = AuxFreeRouter.update_bias

    def counting(self, all_reduce=None):
        seen.append(self.pending_counts_E.sum().item())
        return original(self, all_reduce)

    monkeypatch.setattr(AuxFreeRouter, "update_bias", counting)
    train(
        make_cfg(
            "router=aux_free",
            "aux_loss=none",
            "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=5",
            "trainer.val_check_interval=10",
            name="af",
        )
    )
    micro_batch_slots = 8 * 64 * 2  # data.batch_size * data.seq_len * top_k
    assert seen == [2 * micro_batch_slots] * (5 * 2)  # 5 optimizer steps x 2 MoE layers, each over 2 micro-batches
    state = torch.load(tmp_path / "af" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    steps = state["model.blocks.0.ffn.router.bias_E"] / 1e-3
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 5 and steps.abs().sum() > 0


def test_moe_lab_shortens_openmp_spinning_unless_the_user_chose(tmp_path):
    """GOMP_SPINCOUNT=1000 for moe-lab and the processes it starts (set before torch loads libgomp, which reads it
    once); a GOMP_SPINCOUNT or OMP_WAIT_POLICY of the user's stays, and it is never set after torch is loaded."""
    import os
    import subprocess
    import sys

    probe = (
        "import os, sys; from moe_lab.cli.main import main; main(['--version']); "
        "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    def run(code: str, **extra: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1]

    assert run(probe) == "1000 False"
    assert run(probe, GOMP_SPINCOUNT="7") == "7 False"
    assert run(probe, OMP_WAIT_POLICY="PASSIVE") == "None False"
    late = (
        "import os, torch; from moe_lab.training.runtime import short_openmp_spin as s; "
        "print(s(), os.environ.get('GOMP_SPINCOUNT'))"
    )
    assert run(late) == "False None"


def test_a_machine_busier_than_its_cpus_is_said_once():
    from moe_lab.training.runtime import shared_cores

    assert shared_cores(cpus=2, load=2.4) is None  # a run alone on its 2 cores
    warning = shared_cores(cpus=2, load=4.1)  # beside a busy twin
    assert warning is not None and "load is 4.1 on 2 CPUs" in warning and "threads=1" in warning
    assert shared_cores(cpus=16, load=19.5) is None and shared_cores(cpus=16, load=20.5) is not None


def test_threads_follow_the_cpus_this_process_may_use(make_cfg, tmp_path):
    import os

    from moe_lab.training.runtime import cpu_threads

    available = len(os.sched_getaffinity(0))
    assert cpu_threads() == available and cpu_threads(3) == 3
    assert cpu_threads(None, processes=available) == 1 and cpu_threads(None, processes=4 * available) == 1
    summary = train(make_cfg("threads=1", "trainer.max_steps=3", name="run"))
    assert torch.get_num_threads() == 1
    # The run's average speed is reported beside the last window's.
    assert summary["tokens_per_sec_run"] > 0 and summary["train/tokens_per_sec"] > 0
