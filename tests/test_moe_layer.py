"""The MoE layer: the grouped path against the per-expert loop oracle, capacity, drops, dense-mixture limit."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moe_lab.model import MoEConfig, MoELayer, RouterInputs, expert_capacity
from moe_lab.model.dispatch import plan_dispatch


def build_dispatch(expert_ids_TK, num_experts, capacity, priority_TK=None):
    """The plan of a token-choice routing given as (T, K) choices (slots k-major, as the routers make them)."""
    priority_N = priority_TK.t().reshape(-1) if priority_TK is not None else None
    return plan_dispatch(expert_ids_TK.t().reshape(-1), num_experts, capacity, priority_N)


D = 32


def make_layer(
    num_experts=8,
    top_k=2,
    capacity_factor=None,
    hidden=48,
    activation="swiglu",
    num_shared=0,
    normalize=True,
    seed=0,
    **moe,
) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        num_experts=num_experts,
        expert_hidden=hidden,
        activation=activation,
        num_shared=num_shared,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        router={"name": "topk", "top_k": top_k, "normalize": normalize},
        **moe,
    )
    return MoELayer(D, cfg)


def run(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor, implementation: str):
    layer.cfg.implementation = implementation
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y, out = layer(x)
    (y * grad).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}, out


@pytest.mark.parametrize("top_k,capacity_factor", [(1, None), (2, None), (2, 1.0), (2, 0.5), (4, 0.75), (8, None)])
@pytest.mark.parametrize(
    "activation,num_shared,drop_policy,expert_bias",
    [("swiglu", 0, "position", False), ("gelu", 1, "probability", False), ("swiglu_clamped", 0, "position", True)],
)
def test_grouped_equals_loop_oracle(top_k, capacity_factor, activation, num_shared, drop_policy, expert_bias):
    layer = make_layer(
        top_k=top_k,
        capacity_factor=capacity_factor,
        activation=activation,
        num_shared=num_shared,
        drop_policy=drop_policy,
        shared_gate=num_shared > 0,
        expert_bias=expert_bias,
    )
    if expert_bias:  # gpt-oss's experts: biases off their zero init, pre-activations past the clamp at 7
        with torch.no_grad():
            layer.experts.b_in_EGF.normal_(0.0, 4.0)
            layer.experts.b_out_ED.normal_(0.0, 1.0)
    x = torch.randn(3, 40, D)
    grad = torch.randn(3, 40, D)
    y_g, gx_g, gw_g, out_g = run(layer, x, grad, "grouped")
    y_l, gx_l, gw_l, out_l = run(layer, x, grad, "loop")
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_g, gx_l, rtol=1e-5, atol=1e-6)
    for name in gw_l:
        torch.testing.assert_close(gw_g[name], gw_l[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(out_g.tokens_per_expert_E, out_l.tokens_per_expert_E)
    assert out_g.dropped_slots.item() == out_l.dropped_slots.item()
    if capacity_factor is not None and capacity_factor < 1:
        assert out_g.dropped_slots.item() > 0  # the case really drops


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_latent_experts_grouped_equal_loop_and_identity_projections_give_the_plain_layer(capacity_factor):
    """Latent experts (model.moe.latent_dim): the fast path equals the loop oracle, and with the down- and
    up-projections the identity (latent_dim = d_model) the layer is the plain one with the same router and experts."""
    latent = make_layer(capacity_factor=capacity_factor, latent_dim=16)
    x, grad = torch.randn(3, 40, D), torch.randn(3, 40, D)
    y_g, gx_g, gw_g, out_g = run(latent, x, grad, "grouped")
    y_l, gx_l, gw_l, _ = run(latent, x, grad, "loop")
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_g, gx_l, rtol=1e-5, atol=1e-6)
    for name in gw_l:
        torch.testing.assert_close(gw_g[name], gw_l[name], rtol=1e-5, atol=1e-6, msg=name)
    assert latent.experts.w_in_EGFD.shape[-1] == 16 and latent.experts.w_out_EDF.shape[1] == 16

    identity = make_layer(capacity_factor=capacity_factor, latent_dim=D)
    plain = make_layer(capacity_factor=capacity_factor)
    with torch.no_grad():
        identity.latent_down.weight.copy_(torch.eye(D))
        identity.latent_up.weight.copy_(torch.eye(D))
        plain.load_state_dict({k: v for k, v in identity.state_dict().items() if not k.startswith("latent_")})
    y_i, *_ = run(identity, x, grad, "grouped")
    y_p, *_ = run(plain, x, grad, "grouped")
    torch.testing.assert_close(y_i, y_p, rtol=1e-5, atol=1e-6)


def test_gradients_reach_router_and_every_used_expert():
    layer = make_layer(top_k=2, capacity_factor=None)
    y, out = layer(torch.randn(2, 64, D))
    (y.square().sum() + out.losses["load_balance"] + out.losses["z_loss"]).backward()
    assert layer.router.gate_ED.grad.abs().sum() > 0
    used = out.tokens_per_expert_E > 0
    per_expert = layer.experts.w_in_EGFD.grad.abs().sum(dim=(1, 2))
    assert torch.all(per_expert[used] > 0)


def test_top_k_equal_to_num_experts_is_the_dense_softmax_mixture():
    """With every expert chosen and no capacity limit, MoE = sum_e softmax(gate)_e * FFN_e(x) (Jacobs et al. 1991)."""
    layer = make_layer(num_experts=4, top_k=4, capacity_factor=None, normalize=False)
    x = torch.randn(2, 10, D)
    y, _ = layer(x)
    x_TD = x.reshape(-1, D)
    probs_TE = torch.softmax(x_TD @ layer.router.gate_ED.t(), dim=-1)
    dense = sum(probs_TE[:, e : e + 1] * layer.experts.expert_forward(e, x_TD) for e in range(4))
    torch.testing.assert_close(y.reshape(-1, D), dense, rtol=1e-5, atol=1e-6)


def test_capacity_formula():
    # ceil(cf * T * K / E)
    assert expert_capacity(1.25, 100, 2, 8) == math.ceil(1.25 * 100 * 2 / 8) == 32
    assert expert_capacity(1.0, 7, 1, 2) == 4
    assert expert_capacity(None, 100, 2, 8) is None


def test_dispatch_on_hand_built_routing():
    # 6 tokens, top-2, 3 experts. k-major priority: all first choices (tokens 0..5) before second choices.
    expert_ids_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [0, 2], [2, 0]])
    d = build_dispatch(expert_ids_TK, num_experts=3, capacity=3)
    # Routed slots per expert: expert 0 is chosen first by tokens 0,1,2,4 and second by tokens 3,5.
    assert d.tokens_per_expert_E.tolist() == [6, 3, 3]
    # Expert 0 keeps its 3 highest-priority slots: first choices of tokens 0, 1, 2; drops 3 slots.
    assert d.dropped_slots.item() == 3
    assert d.offs_E.tolist() == [3, 6, 9]
    T = 6
    kept_rows = d.row_slot_R[: d.offs_E[-1]]
    kept = [(int(s) % T, int(s) // T) for s in kept_rows]  # (token, choice)
    assert kept[:3] == [(0, 0), (1, 0), (2, 0)]  # expert 0
    assert sorted(kept[3:6]) == [(0, 1), (2, 1), (3, 0)]  # expert 1
    assert sorted(kept[6:9]) == [(1, 1), (4, 1), (5, 0)]  # expert 2
    dropped = sorted((int(s) % T, int(s) // T) for s in d.row_slot_R[d.offs_E[-1] :])
    assert dropped == [(3, 1), (4, 0), (5, 1)]
    assert sorted(d.row_slot_R.tolist()) == list(range(12))  # every slot has exactly one row


def test_dropped_tokens_get_zero_expert_output():
    """Capacity 1 per expert: only each expert's first token is computed; the rest get exactly zero."""
    layer = make_layer(num_experts=2, top_k=1, capacity_factor=None)
    x = torch.randn(1, 8, D)
    layer.cfg.capacity_factor = 2 / 8  # capacity = ceil(0.25 * 8 * 1 / 2) = 1
    y, out = layer(x)
    ids = layer.router(RouterInputs(x.reshape(-1, D))).expert_ids_TK[:, 0]
    first = {int(ids.tolist().index(e)) for e in set(ids.tolist())}
    for t in range(8):
        if t in first:
            assert y[0, t].abs().sum() > 0
        else:
            assert torch.all(y[0, t] == 0)
    assert out.dropped_slots.item() == 8 - len(first)


def test_eval_mode_uses_eval_capacity_factor():
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=0.5)
    layer.cfg.eval_capacity_factor = None  # dropless at evaluation
    x = torch.randn(2, 32, D)
    _, train_out = layer.train()(x)
    _, eval_out = layer.eval()(x)
    assert train_out.dropped_slots.item() > 0
    assert eval_out.dropped_slots.item() == 0


def test_statistics_are_detached_and_consistent():
    layer = make_layer(num_experts=8, top_k=2, capacity_factor=1.0)
    x = torch.randn(4, 16, D)
    _, out = layer(x)
    assert out.tokens_per_expert_E.sum().item() == 4 * 16 * 2
    assert not out.tokens_per_expert_E.requires_grad and not out.router_entropy.requires_grad
    assert 0 <= out.router_entropy.item() <= math.log(8) + 1e-6
    assert out.losses["load_balance"].requires_grad and out.losses["z_loss"].requires_grad


def test_layer_is_deterministic_and_copyable():
    layer = make_layer(capacity_factor=1.25)
    x = torch.randn(2, 16, D)
    y1, _ = layer(x)
    y2, _ = copy.deepcopy(layer)(x)
    assert torch.equal(y1, y2)


def test_bf16_autocast_runs_the_experts_in_bf16_and_keeps_the_router_in_float32():
    """The path a GPU run takes (trainer=gpu, bf16-mixed), here on CPU autocast."""
    layer = make_layer(top_k=2, capacity_factor=1.25)
    x = torch.randn(2, 32, D)
    reference, _ = layer(x)
    seen = {}
    hook = layer.experts.register_forward_hook(lambda m, args, out: seen.update(dtype=out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.router(RouterInputs(x.reshape(-1, D)))
        y, _ = layer(x)
    hook.remove()
    assert routing.logits_TE.dtype == torch.float32 and routing.weights_TK.dtype == torch.float32
    assert seen["dtype"] == torch.bfloat16
    assert y.dtype == x.dtype
    torch.testing.assert_close(y, reference, rtol=0.1, atol=0.05)


def test_probability_drop_policy_keeps_the_highest_weights():
    expert_ids_TK = torch.tensor([[0], [0], [0], [1]])
    weights_TK = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    d = build_dispatch(expert_ids_TK, num_experts=2, capacity=2, priority_TK=weights_TK)
    kept = sorted(int(s) for s in d.row_slot_R[: d.offs_E[0]])
    assert kept == [1, 2]  # expert 0 keeps tokens with weights 0.9 and 0.5; position policy would keep 0 and 1
    assert sorted(int(s) for s in build_dispatch(expert_ids_TK, 2, 2).row_slot_R[:2]) == [0, 1]


def test_min_capacity():
    assert expert_capacity(0.1, 16, 1, 8, min_capacity=4) == 4
    assert expert_capacity(2.0, 64, 2, 8, min_capacity=4) == 32


def test_shared_expert_gate():
    """Qwen2-MoE: y = routed(x) + sigmoid(x w) * shared(x)."""
    layer = make_layer(num_shared=1, shared_gate=True)
    x_TD = torch.randn(8, D)
    y, _ = layer(x_TD.view(1, 8, D))
    gate = torch.sigmoid(layer.shared_gate(x_TD))
    shared = layer.shared(x_TD)
    layer.shared = None  # only the routed experts remain
    routed, _ = layer(x_TD.view(1, 8, D))
    torch.testing.assert_close(y.view(8, D), routed.view(8, D) + gate * shared, rtol=1e-5, atol=1e-6)
    assert torch.all(gate > 0) and torch.all(gate < 1)
