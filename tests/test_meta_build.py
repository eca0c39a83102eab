"""Building on the meta device (moe_lab/model/experts.py): under expert parallelism a rank materialises only its
own experts, with the weights the one-process model has, and its resident memory stays near its share."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_lab.model import ModelConfig, MoEConfig, MoETransformer
from moe_lab.model.experts import experts_on_meta
from moe_lab.training.checkpoint import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]


def settings(**moe) -> ModelConfig:
    experts = MoEConfig(**{"num_experts": 8, "expert_hidden": 16, **moe})
    return ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, ffn_hidden=64, max_seq_len=32, moe=experts)


@pytest.mark.parametrize(
    "moe", [{}, {"expert_bias": True, "latent_dim": 16, "num_shared": 1}, {"router": {"name": "aux_free"}}]
)
@pytest.mark.parametrize("size", [2, 4])
def test_every_rank_built_on_meta_holds_the_one_process_weights_of_its_part(moe, size):
    torch.manual_seed(5)
    whole = MoETransformer(settings(**moe)).state_dict()
    for rank in range(size):
        torch.manual_seed(5)
        with experts_on_meta():
            part = MoETransformer(settings(**moe))
        banks = [m.experts for m in part.moe_modules()]
        assert all(getattr(b, n).is_meta for b in banks for n in b.expert_weights)  # nothing allocated yet
        part.use_expert_parallel(None, rank, size)
        own = part.state_dict()
        assert own.keys() == whole.keys()
        per_rank = 8 // size
        for name, tensor in own.items():
            if ".experts." in name and name.rsplit(".", 1)[1] in banks[0].expert_weights:
                assert torch.equal(tensor, whole[name][rank * per_rank : (rank + 1) * per_rank]), name
            else:
                assert torch.equal(tensor, whole[name]), name


@pytest.mark.parametrize("on_meta", [True, False])
def test_a_frozen_bank_stays_frozen_when_a_rank_keeps_its_experts(on_meta):
    """Fine-tuning with optim.freeze=[experts] under expert parallelism: the rank's slice is still frozen."""
    torch.manual_seed(0)
    with experts_on_meta() if on_meta else contextlib.nullcontext():
        model = MoETransformer(settings())
    bank = model.moe_modules()[0].experts
    bank.w_out_EDF.requires_grad_(False)
    model.use_expert_parallel(None, 1, 2)
    assert not bank.w_out_EDF.requires_grad and bank.w_in_EGFD.requires_grad
    assert bank.num_experts == 4 and not bank.w_out_EDF.is_meta


def test_each_expert_draws_from_its_own_stream_so_wider_banks_share_their_first_experts():
    """A bank of 16 experts starts with the same first 8 as a bank of 8: paired comparisons over expert counts."""
    torch.manual_seed(1)
    eight = MoETransformer(settings()).moe_modules()[0].experts
    torch.manual_seed(1)
    sixteen = MoETransformer(settings(num_experts=16)).moe_modules()[0].experts
    assert torch.equal(sixteen.w_in_EGFD[:8], eight.w_in_EGFD)
    assert not torch.equal(sixteen.w_in_EGFD[8:], eight.w_in_EGFD)
    std = sixteen.w_in_EGFD.std().item()
    assert 0.018 < std < 0.022  # init_std 0.02


def run_ranks(out: Path, mode: str, checkpoint: Path | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    cmd += [str(REPO / "tests" / "meta_build_worker.py"), str(out), mode]
    cmd += [str(checkpoint)] if checkpoint is not None else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"{mode}.rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.slow
def test_at_expert_parallel_4_no_rank_builds_or_loads_more_than_its_share(tmp_path):
    """64 experts (806 MB) at expert parallel 4 on 4 gloo processes: each rank's resident memory while building
    rises by at most its share of the experts plus the dense part plus 15%, and again while loading a checkpoint of
    the whole model (one file, memory-mapped: only the rank's rows are read), to resume and to start a new run from
    its weights; the control, built whole and then
    sliced, rises by most of the whole."""
    sys.path.insert(0, str(REPO / "tests"))
    from meta_build_worker import model_settings

    torch.manual_seed(0)
    whole = MoETransformer(model_settings())
    total = sum(p.nbytes for n, p in whole.named_parameters() if ".experts." in n)
    checkpoint = tmp_path / "whole.ckpt"
    settings = {"model": dataclasses.asdict(model_settings())}
    state = {f"model.{k}": v for k, v in whole.state_dict().items()}
    AtomicCheckpointIO().save_checkpoint({"hyper_parameters": settings, "state_dict": state}, checkpoint)
    del whole
    meta = run_ranks(tmp_path, "meta", checkpoint)
    for rank, r in enumerate(meta):
        bound = 1.15 * (r["own_expert_bytes"] + r["other_bytes"]) / 1024
        assert r["own_expert_bytes"] * 4 == total
        assert r["built_kib"] <= bound, (rank, r, bound)
        assert r["loaded_kib"] <= bound, (rank, r, bound)
        assert r["init_from_kib"] <= bound, (rank, r, bound)
    control = run_ranks(tmp_path, "whole")
    assert all(r["built_kib"] > 0.8 * total / 1024 for r in control), control
    share = (meta[0]["own_expert_bytes"] + meta[0]["other_bytes"]) / 1024
    print(
        "rise over share + dense, per rank: built "
        + " ".join(f"{r['built_kib'] / share:.3f}" for r in meta)
        + "; loaded "
        + " ".join(f"{r['loaded_kib'] / share:.3f}" for r in meta)
        + "; started from "
        + " ".join(f"{r['init_from_kib'] / share:.3f}" for r in meta)
        + "; control built "
        + " ".join(f"{r['built_kib'] / share:.3f}" for r in control)
    )
