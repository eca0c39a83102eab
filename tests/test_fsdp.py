"""trainer=fsdp (moe_lab/training/fsdp.py) on 2 and 4 gloo processes: DDP's loss curve over 20 steps, checkpoints
that resume under DDP, another FSDP size and one process, and each rank's bytes against docs/scaling.md's arithmetic.
(test_distributed.py holds FSDP against DDP for every router and capacity option, at 4 steps.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_distributed import assert_close_to_scale, finish, metrics, run_plan

from moe_lab.model import ModelConfig
from moe_lab.tools.scaling import Layout, params_per_gpu
from moe_lab.training.checkpoint import read_checkpoint

from conftest import FAST

pytestmark = pytest.mark.slow

LONG = 20  # steps of the 2-rank comparison
STEPS = 8  # steps of the 4-rank runs, checkpointed at 4
TOL = 1e-5
BASE = [
    *FAST,
    "trainer.log_every_n_steps=1",
    "checkpoint.keep=-1",
    "metrics.dashboard=false",
    "threads=1",
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
]


def ranks(n: int, batch: int, steps: int) -> list[str]:
    return [
        f"trainer.devices={n}",
        f"data.batch_size={batch}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // 2}",
        f"checkpoint.every_n_steps={steps // 2}",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    base = [*BASE, f"paths.cache_dir={cache_dir}"]
    two = [*base, *ranks(2, 4, LONG)]
    four = [*base, *ranks(4, 2, STEPS)]
    ckpt = "checkpoints/step000004.ckpt"
    plan2 = [
        {"dir": str(root / "ddp2"), "overrides": [*two, "trainer=ddp"]},
        {"dir": str(root / "fsdp2"), "overrides": [*two, "trainer=fsdp"]},
        {"dir": str(root / "fsdp2-compiled"), "overrides": [*two, "trainer=fsdp", "compile=true"]},
    ]
    plan4 = [
        {"dir": str(root / "ddp4"), "overrides": [*four, "trainer=ddp", "model.moe.expert_parallel=2"]},
        {  # saved in the background (DCP's async_save of the shards): what the resumes below read
            "dir": str(root / "fsdp4"),
            "overrides": [*four, "trainer=fsdp", "model.moe.expert_parallel=2", "checkpoint.async_save=true"],
            "measure_state": str(root / "fsdp4-state"),
        },
        {  # another FSDP size of the experts: expert parallel 4, no EDP
            "dir": str(root / "fsdp4-ep4"),
            "overrides": [*four, "trainer=fsdp", "model.moe.expert_parallel=4", f"ckpt_path={root / 'fsdp4' / ckpt}"],
        },
        {
            "dir": str(root / "ddp4-from-fsdp"),
            "overrides": [*four, "trainer=ddp", "model.moe.expert_parallel=1", f"ckpt_path={root / 'fsdp4' / ckpt}"],
        },
        {
            "dir": str(root / "fsdp4-from-ddp"),
            "overrides": [*four, "trainer=fsdp", "model.moe.expert_parallel=1", f"ckpt_path={root / 'ddp4' / ckpt}"],
        },
        {  # bfloat16 compute: the weights, gradients and reductions stay float32
            "dir": str(root / "fsdp4-bf16"),
            "overrides": [*four, "trainer=fsdp", "trainer.precision=bf16-mixed", "trainer.max_steps=2"],
        },
    ]
    one = [
        {  # a checkpoint of FSDP and one of DDP at the same step, each resumed in one process
            "dir": str(root / f"one-from-{name}"),
            "overrides": [
                *base,
                "trainer.max_steps=6",
                "trainer.val_check_interval=6",
                "model.moe.expert_parallel=1",
                f"ckpt_path={root / name / ckpt}",
            ],
        }
        for name in ("fsdp4", "ddp4")
    ]
    finish(run_plan(plan2, root / "plan2.json", ranks=2), root / "plan2.log")
    finish(run_plan(plan4, root / "plan4.json", ranks=4), root / "plan4.log")
    finish(run_plan(one, root / "one.json", ranks=1), root / "one.log")
    return root


def same_curves(a: Path, b: Path, tol: float = TOL) -> int:
    """The train and validation losses at every step both runs logged agree within `tol`; how many were compared."""
    ma, mb = metrics(a), metrics(b)
    compared = 0
    for key in ("train/loss", "val/loss"):
        for step in sorted(set(ma.get(key, {})) & set(mb.get(key, {}))):
            assert abs(ma[key][step] - mb[key][step]) <= tol, (a.name, b.name, key, step, ma[key][step], mb[key][step])
            compared += 1
    return compared


def test_fsdp_follows_ddps_loss_curve_over_20_steps(runs):
    assert same_curves(runs / "ddp2", runs / "fsdp2") >= LONG + 2


def test_compiled_training_under_fsdp_follows_the_eager_curve(runs):
    """compile=true with trainer=fsdp: torch.compile of the model whose blocks FSDP2 shards (its hooks run eagerly
    around the compiled code), float32, 20 steps on 2 ranks: the eager FSDP curve within 1e-5."""
    assert same_curves(runs / "fsdp2", runs / "fsdp2-compiled") >= LONG + 2
    header = (runs / "plan2.log").read_text()
    assert "32-true, deterministic, compiled (torch.compile)" in header


def test_fsdp_beside_expert_parallelism_on_4_ranks_follows_ddp(runs):
    assert same_curves(runs / "ddp4", runs / "fsdp4") >= STEPS + 2


def test_an_fsdp_checkpoint_resumes_under_another_fsdp_size_and_ddp_and_the_other_way(runs):
    for resumed in ("fsdp4-ep4", "ddp4-from-fsdp", "fsdp4-from-ddp"):
        assert same_curves(runs / "ddp4", runs / resumed) >= STEPS // 2, resumed
    # The same checkpoint, whichever strategy wrote it: one process reads both whole.
    a = read_checkpoint(runs / "fsdp4" / "checkpoints" / "step000004.ckpt")
    b = read_checkpoint(runs / "ddp4" / "checkpoints" / "step000004.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert_close_to_scale(tensor, b["state_dict"][name], name, 1e-5)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for slot in sa:
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_to_scale(sa[slot][key], sb[slot][key], f"{slot} {key}", 1e-3)
    # ... and resumes from either in one process to the same curve.
    assert same_curves(runs / "one-from-fsdp4", runs / "one-from-ddp4") >= 2


def test_bfloat16_compute_trains_with_float32_weights(runs):
    ma = metrics(runs / "fsdp4-bf16")
    assert len(ma["train/loss"]) == 2
    reference = metrics(runs / "fsdp4")["train/loss"]
    for step, loss in ma["train/loss"].items():
        assert abs(loss - reference[step]) < 0.05  # bfloat16's rounding, not another model
    ckpt = read_checkpoint(runs / "fsdp4-bf16" / "checkpoints" / "last.ckpt")
    assert {str(t.dtype) for t in ckpt["state_dict"].values()} == {"torch.float32"}


def test_each_rank_holds_a_quarter_of_the_weights_and_moments_as_docs_scaling_counts(runs):
    """4 ranks, expert parallel 2: the dense part sharded over 4, the experts over 2 x 2. Each rank's weights are
    4 bytes x params_per_gpu(fsdp=True) up to FSDP's uneven shards of small tensors; Adam's moments twice that."""
    saved = read_checkpoint(runs / "fsdp4" / "checkpoints" / "last.ckpt")
    cfg = ModelConfig.from_dict(saved["hyper_parameters"]["model"])
    expected = 4 * params_per_gpu(cfg, Layout(4, 2), fsdp=True)
    records = [json.loads(Path(f"{runs / 'fsdp4-state'}.rank{r}.jsonl").read_text().splitlines()[-1]) for r in range(4)]
    total = 4 * cfg.size_estimate()[0]
    assert sum(r["weights"] for r in records) == total  # every weight held once, on one rank
    for r in records:
        assert 0.9 * expected <= r["weights"] <= 1.1 * expected, (r, expected)
        assert 1.9 * r["weights"] <= r["optimizer"] <= 2.1 * r["weights"] + 4096, r  # exp_avg, exp_avg_sq, steps
    assert 4 * params_per_gpu(cfg, Layout(4, 2)) > 1.5 * expected  # DDP's: the dense part on every rank


def test_a_sharded_fsdp_save_writes_each_ranks_shards_and_gathers_none(runs):
    """DCP's index of the 4-rank checkpoint: every dense weight and moment in 4 pieces (one per rank: FSDP's
    shards, written as they are), every expert bank's in 4 (2 EP ranks' experts, each cut between its 2 EDP ranks);
    under DDP the dense part is one piece and the experts two."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from moe_lab.training.sharded_checkpoint import SafeFileSystemReader

    def pieces(run: str) -> dict[str, int]:
        folder = runs / run / "checkpoints" / "step000004.ckpt"
        stored = SafeFileSystemReader(folder).read_metadata().state_dict_metadata
        return {
            k: len(v.chunks) for k, v in stored.items() if isinstance(v, TensorStorageMetadata) and v.size.numel() > 1
        }

    fsdp, ddp = pieces("fsdp4"), pieces("ddp4")
    assert fsdp.keys() == ddp.keys()
    experts = {k for k in fsdp if ".experts.w_" in k}
    assert experts and len(experts) < len(fsdp)
    assert all(pieces == 4 for pieces in fsdp.values()), fsdp
    for key in experts:
        assert ddp[key] == 2, key
    # the expert weights and their two Adam moments (numbered by parameter): two pieces; everything else one
    assert sorted(ddp.values()) == [1] * (len(ddp) - 3 * len(experts)) + [2] * (3 * len(experts))
