"""Training math that does not depend on the parallel layout, proved with 2 gloo processes on CPU.

(a) For every router (all of them support expert parallelism) and every capacity option, and for the other settings
    below: `model.moe.expert_parallel=2` equals `expert_parallel=1` on the same 2 ranks, step for step: losses,
    expert loads, drops, validation loss, and the final parameters and optimizer state. With
    trainer.deterministic=true the two are bit for bit equal; the default (one grouped GEMM over every source rank's
    rows) differs by float rounding in the expert weight gradients, checked with a tolerance on a few settings.
(b) For every setting defined per micro-batch (all of the above but aux_loss=global): 2 data-parallel ranks equal
    1 process that accumulates the same two micro-batches (trainer.accumulate_grad_batches=2), capacity and drops
    included.
(c) An expert-parallel checkpoint evaluates in 1 process with the same validation loss; resuming under expert
    parallelism continues the curve; `load_model` and `export` read the checkpoint. The expert-parallel runs write
    sharded checkpoints (the default under expert parallelism) except the fast-path ones, which write one file:
    both are read whole and compared alike. (test_sharded_checkpoints.py has resharding and memory.)

Every run is small (4 optimizer steps of a 2-layer model); the 2-rank runs all happen in one torchrun launch of
`layout_worker.py`, the 1-process runs in one plain process beside it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from moe_lab.training.checkpoint import read_checkpoint
from moe_lab.training.schemas import config_dir

from conftest import FAST, REPO, router_options, router_partners

pytestmark = pytest.mark.slow

STEPS = 4
COMMON = [
    *FAST,
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",
    f"checkpoint.every_n_steps={STEPS}",  # the last one only: the compared state (the default setting adds step 2's)
    "checkpoint.keep=-1",
    "metrics.dashboard=false",
    "threads=1",
]
# The same micro-batches of 4 sequences: one per rank and step on 2 ranks, or two per step on one process.
TWO_RANKS = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "data.batch_size=4",
    f"trainer.val_check_interval={STEPS}",
]
DETERMINISTIC = ["trainer.deterministic=true"]
ONE_PROCESS = ["data.batch_size=4", "trainer.accumulate_grad_batches=2", f"trainer.val_check_interval={2 * STEPS}"]

ROUTERS = router_options()
CAPACITIES = sorted(p.stem for p in (Path(config_dir()) / "capacity").glob("*.yaml"))
PER_MICRO_BATCH = {
    **{
        f"{router}-{capacity}": [f"router={router}", f"capacity={capacity}", *router_partners(router)]
        for router in ROUTERS
        for capacity in CAPACITIES
    },
    "seq_z": ["aux_loss=seq_z"],
    "cv": ["router=noisy_topk", "aux_loss=cv"],
    "drop_by_probability": ["capacity=cf1_0", "model.moe.drop_policy=probability"],
    "min_capacity": ["capacity=cf1_0", "model.moe.min_capacity=72"],
    "shared_gated": ["model.moe.num_shared=1", "model.moe.shared_gate=true"],
    "fine_grained_e64": ["experts=e64_fine", "capacity=cf1_0"],
    "first_dense_layer": ["model.n_layers=3", "model.moe.first_dense_layers=1"],
    # DeepSeek-V3's architecture (latent attention, groups, a shared expert) with two routers
    "deepseek_v3": ["model=deepseek_v3_tiny", "model.n_layers=3"],
    "deepseek_v3_topk": ["model=deepseek_v3_tiny", "model.n_layers=3", "router=topk", "model.moe.router.score=sigmoid"],
    "glm45": ["model=glm45_tiny", "model.n_layers=3"],  # partial rotary, q/k/v biases and norms
    "glm45_topk": ["model=glm45_tiny", "model.n_layers=3", "router=topk"],
    # sinks, a window of 16 on layers 0 and 2, expert and gate biases, the clamped SwiGLU
    "gpt_oss": ["model=gpt_oss_tiny", "model.n_layers=3", "model.sliding_window=16"],
    "gpt_oss_aux_free": ["model=gpt_oss_tiny", "model.n_layers=3", "model.sliding_window=16", "router=aux_free"],
    # Gated DeltaNet in layers 0 and 1, gated attention in layer 2; two routers
    "qwen3_next": ["model=qwen3_next_tiny", "model.n_layers=3", "model.linear_layers=[0,1]"],
    "qwen3_next_aux_free": [
        "model=qwen3_next_tiny",
        "model.n_layers=3",
        "model.linear_layers=[0,1]",
        "router=aux_free",
    ],
    "latent_experts": ["experts=e16_latent"],  # the all-to-all carries latent rows
    "multi_token_prediction": ["model.mtp_depth=2"],  # two more MoE blocks, their loss in the gradient
    "layers_of_8_and_4_experts": ["model.moe.layer_experts=[8,4]", "capacity=cf1_0"],  # a total budget's pruning
}
# The default setting also runs the routing analyses at every validation (their counts are summed over ranks), and
# saves at step 2 too, where the resumed run below starts.
PER_MICRO_BATCH["topk-cf1_25"] = [
    *PER_MICRO_BATCH["topk-cf1_25"],
    "metrics.analysis_every_n_steps=2",
    "checkpoint.every_n_steps=2",
]
GLOBAL = {"global_balance": ["aux_loss=global", "capacity=cf1_0"]}  # counts over all ranks: (a) only
# The fast (default) path of expert parallelism, compared up to float rounding. Not the paper's expert choice: each
# expert takes its top C of all 256 tokens, so a rounding difference flips near-ties (measured: parameters 0.5-3%
# apart after 4 steps, losses within 2e-6); it is held bit for bit in deterministic mode instead.
FAST_PATH = ["topk-cf1_25", "fine_grained_e64", "global_balance", "expert_choice_causal-cf1_0"]
TOL = 1e-5
# trainer=fsdp (FSDP2 beside expert parallelism) against DDP, on the same 2 ranks: every router (at capacity 1.25),
# every capacity (top-k), and the settings that change the model's parts; with expert parallelism 2 on a few.
FSDP = [
    name
    for name in PER_MICRO_BATCH
    if name.endswith("-cf1_25") or name.startswith("topk-") or not any(name.startswith(r + "-") for r in ROUTERS)
]
FSDP_EP2 = ["topk-cf1_25", "expert_choice-cf1_0", "aux_free-cf1_25", "fine_grained_e64", "layers_of_8_and_4_experts"]


def run_plan(plan: list[dict], path: Path, ranks: int, env: Optional[dict] = None) -> subprocess.Popen:
    path.write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("WANDB_API_KEY", None)
    worker = str(REPO / "tests" / "layout_worker.py")
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        if ranks > 1
        else [sys.executable]
    )
    log = open(path.with_suffix(".log"), "w")
    return subprocess.Popen(
        [*launcher, worker, str(path)], cwd=path.parent, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def finish(proc: subprocess.Popen, log: Path, timeout: int = 1200) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.read_text()[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    common = [*COMMON, f"paths.cache_dir={cache_dir}"]
    settings = {**PER_MICRO_BATCH, **GLOBAL}
    ddp = [
        {
            "dir": str(root / f"{name}-ep{ep}"),
            "overrides": [*common, *TWO_RANKS, *DETERMINISTIC, *overrides, f"model.moe.expert_parallel={ep}"],
        }
        for name, overrides in settings.items()
        for ep in (1, 2)
    ]
    ddp += [
        {
            "dir": str(root / f"{name}-fast-ep{ep}"),
            # One file (rank 0 gathers every expert), where the runs above write sharded checkpoints under
            # expert parallelism (checkpoint.format=auto): both formats hold every expert, checked alike.
            "overrides": [
                *common,
                *TWO_RANKS,
                *settings[name],
                f"model.moe.expert_parallel={ep}",
                "checkpoint.format=file",
            ],
        }
        for name in FAST_PATH
        for ep in (1, 2)
    ]
    ddp += [
        {
            "dir": str(root / f"{name}-fsdp-ep{ep}"),
            "overrides": [*common, *TWO_RANKS, *DETERMINISTIC, *settings[name], f"model.moe.expert_parallel={ep}"]
            + ["trainer.strategy=fsdp"],
        }
        for ep, names in ((1, FSDP), (2, FSDP_EP2))
        for name in names
    ]
    # Resume the default setting's expert-parallel run at step 2, under expert parallelism.
    ddp.append(
        {
            "dir": str(root / "resumed-ep2"),
            "overrides": [
                *common,
                *TWO_RANKS,
                *DETERMINISTIC,
                "model.moe.expert_parallel=2",
                f"ckpt_path={root / 'topk-cf1_25-ep2' / 'checkpoints' / 'step000002.ckpt'}",
            ],
        }
    )
    one = [
        {"dir": str(root / f"{name}-one"), "overrides": [*common, *ONE_PROCESS, *overrides]}
        for name, overrides in PER_MICRO_BATCH.items()
    ]
    procs = [
        (run_plan(ddp, root / "ddp.json", ranks=2), root / "ddp.log"),
        (run_plan(one, root / "one.json", ranks=1), root / "one.log"),
    ]
    for proc, log in procs:
        finish(proc, log)
    return root


def metrics(run: Path) -> dict[str, dict[int, float]]:
    """Every logged series of a run: key -> {step: value}."""
    out: dict[str, dict[int, float]] = {}
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None) and key != "step":
                    out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


# Logged series that must agree between layouts (throughput, timing and the running token count may not).
COMPARED = (
    "train/loss",
    "val/loss",
    "moe/dropped_frac",
    "moe/max_imbalance",
    "train/aux/",
    "/load",
    "/dropped_frac",
    "/vocab_specialisation",
    "/repeat_top1",
    "/max_coactivation",
)


def assert_same_curves(a: Path, b: Path, tol: float = 0.0) -> None:
    ma, mb = metrics(a), metrics(b)
    keys = [k for k in ma if k.startswith(COMPARED) or k.endswith(COMPARED)]
    assert "train/loss" in keys and any(k.endswith("/load") for k in keys)
    assert len(ma["train/loss"]) == STEPS
    for key in keys:
        common_steps = sorted(set(ma[key]) & set(mb.get(key, {})))
        assert common_steps, (key, sorted(ma[key]), sorted(mb.get(key, {})))
        for step in common_steps:
            assert abs(ma[key][step] - mb[key][step]) <= tol, (key, step, ma[key][step], mb[key][step])


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, name: str, rel: float) -> None:
    """Equal up to `rel` of the tensor's own scale (Adam's second moments are ~1e-8); rel=0: bit for bit."""
    assert a.shape == b.shape, name
    scale = max(a.abs().max().item(), 1e-30)
    assert (a.double() - b.double()).abs().max().item() <= rel * scale, (name, scale)


def assert_same_final_state(a: Path, b: Path, rel: float = 0.0) -> None:
    """The last checkpoints of two runs hold the same weights and optimizer moments (a sharded one read whole)."""
    ca = read_checkpoint(a / "checkpoints" / "last.ckpt")
    cb = read_checkpoint(b / "checkpoints" / "last.ckpt")
    assert ca["state_dict"].keys() == cb["state_dict"].keys()  # every expert, whatever the layout
    for name, tensor in ca["state_dict"].items():
        assert_close_to_scale(tensor, cb["state_dict"][name], name, rel)
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and sa
    for slot, state in sa.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_to_scale(state[key], sb[slot][key], f"optimizer slot {slot} {key}", rel)


@pytest.mark.parametrize("name", [*PER_MICRO_BATCH, *GLOBAL])
def test_a_expert_parallel_equals_data_parallel_bit_for_bit(runs, name):
    assert_same_curves(runs / f"{name}-ep1", runs / f"{name}-ep2")
    assert_same_final_state(runs / f"{name}-ep1", runs / f"{name}-ep2")


@pytest.mark.parametrize("name", FAST_PATH)
def test_a_fast_expert_parallel_equals_data_parallel_up_to_rounding(runs, name):
    """One grouped GEMM over all source ranks' rows sums each expert's weight gradient in another order: float
    rounding (about 1e-7 relative per step), not different math."""
    assert_same_curves(runs / f"{name}-fast-ep1", runs / f"{name}-fast-ep2", tol=TOL)
    assert_same_final_state(runs / f"{name}-fast-ep1", runs / f"{name}-fast-ep2", rel=1e-3)


@pytest.mark.parametrize("name", FSDP)
def test_a_fsdp_equals_ddp(runs, name):
    """The dense part sharded by FSDP2 (reduce-scatter instead of all-reduce: another order of the same sums). The
    paper's expert choice (each expert's top C of all 256 tokens) flips near-ties under any such rounding, as on
    the fast path above: its routing statistics move by a token or two (measured: experts per token of a domain by
    0.008, the z-loss by 1e-4 at step 3) while its losses stay within 1e-5 (measured: 5e-6)."""
    a, b = runs / f"{name}-ep1", runs / f"{name}-fsdp-ep1"
    if name.startswith("expert_choice-"):
        ma, mb = metrics(a), metrics(b)
        for key in ("train/loss", "val/loss"):
            assert ma[key].keys() == mb[key].keys()
            assert all(abs(ma[key][s] - mb[key][s]) <= TOL for s in ma[key]), (key, ma[key], mb[key])
        return
    assert_same_curves(a, b, tol=TOL)
    assert_same_final_state(a, b, rel=1e-3)


@pytest.mark.parametrize("name", FSDP_EP2)
def test_a_fsdp_beside_expert_parallelism_equals_ddp(runs, name):
    """As above, at expert parallel 2. Expert choice's near-ties flipped by FSDP's summation order move some experts'
    weights and moments by a token's gradient (measured on an AVX2 CPU after 4 steps: weights 0.5% of their scale
    apart, Adam's first moments 1.5%; the dense weights within 1e-4, the losses within 3e-6): its final state is held
    to 5e-2, which a wrong gradient scale (a factor in the moments) still fails, the others' to 1e-3."""
    assert_same_curves(runs / f"{name}-ep2", runs / f"{name}-fsdp-ep2", tol=TOL)
    rel = 5e-2 if name.startswith("expert_choice-") else 1e-3
    assert_same_final_state(runs / f"{name}-ep2", runs / f"{name}-fsdp-ep2", rel=rel)


@pytest.mark.parametrize("name", list(PER_MICRO_BATCH))
def test_b_two_ranks_equal_one_process_accumulating_the_same_micro_batches(runs, name):
    assert_same_curves(runs / f"{name}-ep1", runs / f"{name}-one")
    assert_same_final_state(runs / f"{name}-ep1", runs / f"{name}-one")


def test_routing_analyses_are_compared_across_layouts(runs):
    """The analyses of metrics.analysis_every_n_steps are among the curves compared above (summed over ranks)."""
    for run in ("topk-cf1_25-ep1", "topk-cf1_25-ep2", "topk-cf1_25-one"):
        logged = metrics(runs / run)
        assert sorted(logged["analysis/layer1/repeat_top1"]) == [0, STEPS], run
        assert 0 < logged["analysis/layer0/vocab_specialisation"][STEPS] <= 1


def test_capacity_really_drops_in_the_compared_runs(runs):
    """The capacity cases are not vacuous: cf1_0 drops token slots, dropless never does."""
    assert max(metrics(runs / "topk-cf1_0-ep2")["moe/dropped_frac"].values()) > 0.01
    assert max(metrics(runs / "topk-dropless-ep2")["moe/dropped_frac"].values()) == 0


def test_c_expert_parallel_checkpoint_in_one_process_gives_the_same_validation_loss(runs, cache_dir, tmp_path):
    """`moe-lab eval` of the expert_parallel=2 checkpoint, in one process, with the run's eval capacity factor."""
    from moe_lab.cli.main import main

    final = metrics(runs / "topk-cf1_25-ep2")["val/loss"][STEPS]
    data = [o for o in FAST if o.startswith(("data.", "++data."))]
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(runs / "topk-cf1_25-ep2" / "checkpoints" / "last.ckpt"),
                *data,
                "data.batch_size=4",
                f"paths.cache_dir={cache_dir}",
                "--capacity",
                "checkpoint",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert abs(json.loads(out.read_text())["overall"]["loss"] - final) <= TOL


def test_resuming_under_expert_parallelism_continues_the_loss_curve(runs):
    resumed = metrics(runs / "resumed-ep2")["train/loss"]
    full = metrics(runs / "topk-cf1_25-ep2")["train/loss"]
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert abs(resumed[step] - full[step]) <= TOL, step


def test_load_model_and_export_read_an_expert_parallel_checkpoint(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    import moe_lab
    from moe_lab.tools.export import export_hf

    ckpt = runs / "topk-dropless-ep2" / "checkpoints" / "last.ckpt"
    model = moe_lab.load_model(ckpt)
    ids = torch.randint(0, 257, (2, 24))
    logits = model(ids)
    assert logits.shape == (2, 24, 320) and torch.isfinite(logits).all()
    export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
