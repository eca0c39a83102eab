"""Data and expert parallelism with 2 gloo processes on CPU, launched by Lightning as `moe-lab train trainer=ddp`
would be: (a) DDP equals one process on the same global batch, (b) expert parallelism equals data parallelism,
(c) an expert-parallel checkpoint loads into one process with the same validation loss; and resuming under expert
parallelism, and capacity under expert parallelism behaving as on one device."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli

pytestmark = pytest.mark.slow

TOL = 1e-5
COMMON = ["aux_loss=global", "trainer.max_steps=8", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1",
          "checkpoint.every_n_steps=4", "checkpoint.keep=-1", "metrics.dashboard=false"]
TWO_RANKS = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4"]
ONE_RANK = ["data.batch_size=8"]  # the same global batch


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    plan = {
        "one": ONE_RANK + ["capacity=dropless"],
        "ddp": TWO_RANKS + ["capacity=dropless"],
        "ep2": TWO_RANKS + ["capacity=dropless", "model.moe.expert_parallel=2"],
        "one_cf": ONE_RANK + ["capacity=cf1_0"],
        "ep2_cf": TWO_RANKS + ["capacity=cf1_0", "model.moe.expert_parallel=2"],
    }
    out = {}
    for name, overrides in plan.items():
        out[name] = root / name
        result = run_cli(["train", *FAST, *COMMON, *overrides, f"paths.cache_dir={cache_dir}",
                          f"hydra.run.dir={out[name]}"], cwd=root)
        assert result.returncode == 0, (name, result.stderr[-3000:])
    # Resume the expert-parallel run at step 4, under expert parallelism.
    out["ep2_resumed"] = root / "ep2_resumed"
    result = run_cli(["train", *FAST, *COMMON, *TWO_RANKS, "capacity=dropless", "model.moe.expert_parallel=2",
                      f"ckpt_path={out['ep2'] / 'checkpoints' / 'step000004.ckpt'}", f"paths.cache_dir={cache_dir}",
                      f"hydra.run.dir={out['ep2_resumed']}"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    # The expert-parallel checkpoint in one process (expert_parallel=1): validation only, at the same step.
    out["ep2_in_one"] = root / "ep2_in_one"
    result = run_cli(["train", *FAST, *COMMON, *ONE_RANK, "capacity=dropless",
                      f"ckpt_path={out['ep2'] / 'checkpoints' / 'last.ckpt'}", f"paths.cache_dir={cache_dir}",
                      f"hydra.run.dir={out['ep2_in_one']}"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def series(run: Path, key: str) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def assert_same(a: dict, b: dict, steps=None) -> None:
    steps = steps if steps is not None else sorted(a)
    assert steps and set(steps) <= set(b), (sorted(a), sorted(b))
    for step in steps:
        assert abs(a[step] - b[step]) <= TOL, (step, a[step], b[step])


def test_a_ddp_equals_one_process_on_the_same_global_batch(runs):
    assert_same(series(runs["one"], "train/loss"), series(runs["ddp"], "train/loss"))
    assert_same(series(runs["one"], "val/loss"), series(runs["ddp"], "val/loss"))
    assert len(series(runs["one"], "train/loss")) == 8


def test_b_expert_parallel_equals_data_parallel(runs):
    assert_same(series(runs["ddp"], "train/loss"), series(runs["ep2"], "train/loss"))
    assert_same(series(runs["ddp"], "moe/layer0/expert3/load"), series(runs["ep2"], "moe/layer0/expert3/load"))
    ddp = torch.load(runs["ddp"] / "checkpoints" / "last.ckpt", weights_only=False)
    ep2 = torch.load(runs["ep2"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert ddp["state_dict"].keys() == ep2["state_dict"].keys()
    for name, tensor in ddp["state_dict"].items():  # every expert is in the checkpoint, whatever the layout
        torch.testing.assert_close(ep2["state_dict"][name], tensor, rtol=0, atol=TOL, msg=name)
    for slot, state in ddp["optimizer_states"][0]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ep2["optimizer_states"][0]["state"][slot][key], state[key], rtol=0, atol=TOL)


def test_c_expert_parallel_checkpoint_in_one_process_gives_the_same_validation_loss(runs):
    final = series(runs["ep2"], "val/loss")[8]
    assert abs(series(runs["ep2_in_one"], "val/loss")[8] - final) <= TOL


def test_resuming_under_expert_parallelism_continues_the_loss_curve(runs):
    resumed = series(runs["ep2_resumed"], "train/loss")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert_same(resumed, series(runs["ep2"], "train/loss"), steps=[5, 6, 7, 8])


def test_capacity_under_expert_parallelism_is_as_on_one_device(runs):
    """Capacity is per expert over the EP group's tokens, and the kept slots are those one device holding the whole
    group's batch keeps: the same drops, so the same losses."""
    assert_same(series(runs["one_cf"], "train/loss"), series(runs["ep2_cf"], "train/loss"))
    dropped_one, dropped_ep = series(runs["one_cf"], "moe/dropped_frac"), series(runs["ep2_cf"], "moe/dropped_frac")
    assert max(dropped_one.values()) > 0.01  # the case really drops
    assert_same(dropped_one, dropped_ep)


def test_load_model_and_export_read_an_expert_parallel_checkpoint(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    import moe_lab
    from moe_lab.export import export_hf

    ckpt = runs["ep2"] / "checkpoints" / "last.ckpt"
    model = moe_lab.load_model(ckpt)
    ids = torch.randint(0, 257, (2, 24))
    logits = model(ids)
    assert logits.shape == (2, 24, 320) and torch.isfinite(logits).all()
    export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
