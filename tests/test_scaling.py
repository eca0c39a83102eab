"""docs/scaling.md's arithmetic (moe_lab/tools/scaling.py) against what moe-lab really holds, where this machine can
show it: the parameters one expert-parallel rank keeps, and the bytes AdamW adds per parameter."""

from __future__ import annotations

import pytest
import torch

from moe_lab.model import MoETransformer
from moe_lab.model.config import ModelConfig
from moe_lab.tools import scaling


def small(**moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
        moe=scaling._moe(8, 2, 16, first_dense_layers=1, **moe),
    )  # fmt: skip


@pytest.mark.parametrize("expert_parallel", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "moe", [{}, {"num_shared": 1}, {"latent_dim": 16}, {"expert_bias": True, "activation": "swiglu_clamped"}]
)
def test_the_parameters_of_an_expert_parallel_rank(expert_parallel, moe):
    cfg = small(**moe)
    model = MoETransformer(cfg)
    assert model.num_params()["total"] == cfg.size_estimate()[0]
    model.use_expert_parallel(None, rank=expert_parallel - 1, size=expert_parallel)  # the last rank's experts
    held = sum(p.numel() for p in model.parameters())
    assert held == scaling.params_per_gpu(
        cfg, scaling.Layout(gpus=2 * expert_parallel, expert_parallel=expert_parallel)
    )


def test_training_holds_sixteen_bytes_a_parameter_before_activations():
    """float32 weights and gradients, and AdamW's two float32 moments, as moe-lab trains."""
    cfg = small()
    model = MoETransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 64, (2, 9))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    optimizer.step()
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    held = sum(t.numel() * t.element_size() for t in tensors)
    assert held == scaling.training_bytes_per_gpu(cfg, scaling.Layout(gpus=1, expert_parallel=1))


def test_the_reference_models_have_their_published_sizes():
    """OLMoE-1B-7B: 6.92B parameters, 1.28B active; Mixtral-8x7B: 46.7B, 12.9B (their papers)."""
    olmoe, mixtral = scaling.REFERENCE_MODELS["OLMoE-1B-7B"], scaling.REFERENCE_MODELS["Mixtral-8x7B"]
    assert olmoe.size_estimate()[0] / 1e9 == pytest.approx(6.92, abs=0.01)
    assert scaling.active_params(olmoe) / 1e9 == pytest.approx(1.28, abs=0.01)
    assert mixtral.size_estimate()[0] / 1e9 == pytest.approx(46.7, abs=0.05)
    assert scaling.active_params(mixtral) / 1e9 == pytest.approx(12.9, abs=0.05)


def test_all_to_all_bytes_follow_the_slots_that_leave_the_rank():
    cfg = scaling.REFERENCE_MODELS["OLMoE-1B-7B"]
    assert scaling.all_to_all_bytes_per_step(cfg, scaling.Layout(8, 1)) == 0
    one_layer = 4 * 8192 * 8 * 2048 * 2 * 7 // 8  # dispatch and combine, forward and backward, bf16
    assert scaling.all_to_all_bytes_per_step(cfg, scaling.Layout(8, 8)) == 16 * one_layer


def test_latent_experts_send_latent_rows():
    """The all-to-all carries rows of the experts' width: latent_dim numbers a slot instead of d_model."""
    layout = scaling.Layout(gpus=16, expert_parallel=8)
    full, latent = small(), small(latent_dim=8)
    assert scaling.all_to_all_bytes_per_step(latent, layout) * 4 == scaling.all_to_all_bytes_per_step(full, layout)
