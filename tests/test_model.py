"""Auxiliary losses on hand-computed examples, the transformer's causality and its parameter accounting."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lab.model import ModelConfig, MoEConfig, MoETransformer
from moe_lab.model.losses import load_balance_loss, router_z_loss

from conftest import assert_causal


def test_load_balance_loss_hand_computed():
    # 2 experts, 2 tokens, top-1: token 0 -> expert 0, token 1 -> expert 1.
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    counts = torch.tensor([1, 1])
    # f = [0.5, 0.5], P = [0.55, 0.45]: 2 * (0.5 * 0.55 + 0.5 * 0.45) = 1.0
    assert load_balance_loss(probs, counts).item() == pytest.approx(1.0)
    # Both tokens on expert 0: f = [1, 0] -> 2 * 0.55 = 1.1
    assert load_balance_loss(probs, torch.tensor([2, 0])).item() == pytest.approx(1.1)
    # Collapsed routing with confident probabilities tends to E.
    assert load_balance_loss(torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3), torch.tensor([3, 0, 0, 0])).item() == 4.0


def test_load_balance_loss_counts_top_k_slots():
    # top-2 over 4 experts, 2 tokens: slots {0,1} and {0,2} -> f = [2, 1, 1, 0] / 4
    probs = torch.full((2, 4), 0.25)
    assert load_balance_loss(probs, torch.tensor([2, 1, 1, 0])).item() == pytest.approx(4 * 0.25 * 1.0)


def test_load_balance_loss_gradient_flows_through_probabilities_only():
    logits = torch.randn(5, 3, requires_grad=True)
    counts = torch.tensor([3.0, 1.0, 1.0], requires_grad=True)
    load_balance_loss(logits.softmax(-1), counts).backward()
    assert logits.grad.abs().sum() > 0
    assert counts.grad is None


def test_z_loss_hand_computed():
    # logsumexp([0, 0]) = log 2; logsumexp([log 3, 0]) = log 4
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def tiny_config(**moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=3,
        n_heads=4,
        ffn_hidden=64,
        max_seq_len=64,
        moe=MoEConfig(num_experts=4, expert_hidden=32, **moe),
    )


def test_aux_losses_are_averaged_over_layers_not_concatenated():
    torch.manual_seed(0)
    model = MoETransformer(tiny_config(capacity_factor=None))
    out = model(torch.randint(0, 64, (2, 16)))
    per_layer = [out.moe[layer].losses["load_balance"] for layer in model.moe_layers]
    assert len(per_layer) == 3
    assert out.aux_losses["load_balance"].item() == pytest.approx(torch.stack(per_layer).mean().item())
    weights = model.cfg.moe.aux_loss
    expected = weights.load_balance * out.aux_losses["load_balance"] + weights.z_loss * out.aux_losses["z_loss"]
    assert out.aux_loss.item() == pytest.approx(expected.item())


def test_moe_layer_placement():
    cfg = tiny_config()
    cfg.n_layers = 6
    cfg.moe.first_dense_layers = 1
    cfg.moe.every_n_layers = 2
    assert cfg.moe_layers == [1, 3, 5]
    model = MoETransformer(cfg)
    assert model.moe_layers == [1, 3, 5]
    cfg.moe.enabled = False
    assert MoETransformer(cfg).moe_layers == []


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_dropless_model_is_causal(n_kv_heads):
    """Changing token t never changes the logits before t (dropless routing: no token competes for capacity)."""
    torch.manual_seed(0)
    cfg = tiny_config(capacity_factor=None, eval_capacity_factor=None)
    cfg.n_kv_heads = n_kv_heads
    assert_causal(MoETransformer(cfg).eval(), batch=2, seq=24, t=13)


def test_parameter_accounting():
    torch.manual_seed(0)
    dense_cfg = tiny_config()
    dense_cfg.moe.enabled = False
    dense = MoETransformer(dense_cfg)
    counts = dense.num_params()
    norms = sum(p.numel() for n, p in dense.named_parameters() if n.endswith("norm.weight"))
    assert counts["routed_experts"] == 0
    assert counts["active"] == counts["total"] - counts["embedding"] - norms

    moe = MoETransformer(tiny_config(router={"name": "topk", "top_k": 2, "normalize": True}))
    c = moe.num_params()
    per_expert = sum(b.ffn.experts.w_in_EGFD[0].numel() + b.ffn.experts.w_out_EDF[0].numel() for b in moe.blocks)
    assert c["routed_experts"] == 4 * per_expert
    # Active = everything a token multiplies by: the experts' share is top_k / num_experts.
    non_expert = c["total"] - c["routed_experts"] - c["embedding"] - norms
    assert c["active"] == non_expert + 2 * per_expert
    # 6N + attention (PaLM appendix B)
    cfg = moe.cfg
    assert moe.flops_per_token(32) == 6 * c["active"] + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 32


def test_sequence_longer_than_max_is_rejected():
    model = MoETransformer(tiny_config())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_a_seed_gives_every_model_the_same_shared_parts():
    """Seeds pair across configurations (model/seeding.py): under one seed a dense model, an MoE model and one with
    twice the experts share their embeddings, attention and output head; two routers share their experts; another
    seed changes everything; building a model leaves the process's random stream where it was."""
    import dataclasses

    from moe_lab.model.router_configs import TopKRouterConfig

    def build(cfg: ModelConfig, seed: int = 3) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        model = MoETransformer(cfg)
        assert torch.equal(torch.get_rng_state(), before)
        return model.state_dict()

    moe = tiny_config(capacity_factor=None)
    dense = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, enabled=False))
    wider = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, num_experts=8))
    other_router = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, router=TopKRouterConfig(top_k=1)))
    a, d, w, r = build(moe), build(dense), build(wider), build(other_router)
    shared = [k for k in a if ".ffn." not in k]
    assert any(".attn." in k for k in shared) and "embed.weight" in shared and "lm_head.weight" in shared
    for other in (d, w, r):
        assert all(torch.equal(a[k], other[k]) for k in shared)
    experts = [k for k in a if ".experts." in k]
    assert experts and all(torch.equal(a[k], r[k]) for k in experts)
    assert not torch.equal(a["blocks.0.ffn.experts.w_in_EGFD"], a["blocks.1.ffn.experts.w_in_EGFD"])
    b = build(moe, seed=4)
    assert not any(torch.equal(a[k], b[k]) for k in a if k.endswith("weight") and "norm" not in k)


def _mtp_model(depth: int = 2) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ffn_hidden=64,
        max_seq_len=64,
        mtp_depth=depth,
        mtp_loss_weight=0.5,
        moe=MoEConfig(num_experts=4, expert_hidden=32, capacity_factor=None, eval_capacity_factor=None),
    )
    return MoETransformer(cfg).eval()


def test_multi_token_prediction_follows_its_definition_position_by_position():
    """DeepSeek-V3 eq. 21-25, written out per position i and depth k: h^k_i = TRM_k(M_k [RMSNorm(h^{k-1}_i);
    RMSNorm(Emb(t_{i+k}))]), P^k_{i+k+1} = OutHead(h^k_i), L^k = CE over every i with a token i + k + 1; the loss the
    model adds is weight * mean_k L^k."""
    model = _mtp_model(depth=2)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    S = inputs.shape[1]
    with torch.no_grad():
        out = model(inputs, targets)
        h = model.embed(inputs)
        for block in model.blocks:
            h = block(h)[0]
        expected = []
        for module in model.mtp:
            k = module.depth
            rows = []  # position i of depth k, built from position i of depth k - 1 and the embedding of token i + k
            for i in range(S - k):
                joined = torch.cat([module.hidden_norm(h[:, i]), module.embed_norm(model.embed(inputs[:, i + k]))], -1)
                rows.append(module.proj(joined))
            h = module.block(torch.stack(rows, dim=1))[0]  # causal: position i reads rows 0..i only
            logits = model.lm_head(module.norm(h))
            predicted = torch.stack([targets[:, i + k] for i in range(S - k)], dim=1)  # token i + k + 1
            expected.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), predicted.flatten()))
    assert len(out.mtp_losses) == 2
    for got, want in zip(out.mtp_losses, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss, 0.5 * (expected[0] + expected[1]) / 2)


def test_multi_token_prediction_leaves_the_model_and_its_generation_alone():
    """The main logits of a model with MTP modules are those of the same weights without them, and the prediction
    modules see no token beyond the one they are given (depth k at position i: tokens up to i + k)."""
    model = _mtp_model(depth=1)
    plain = MoETransformer(ModelConfig(**{**model.cfg.__dict__, "mtp_depth": 0})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)
        base = model(ids[:, :-1], ids[:, 1:])
        changed = ids.clone()
        changed[:, 10:] = (changed[:, 10:] + 1) % 64  # tokens 10.. differ: depth-1 inputs from position 9 on
        other = model(changed[:, :-1], changed[:, 1:])
    assert model.moe_layers == [0, 1, 2]  # the module's MoE block is numbered after the model's
    assert sorted(base.moe) == [0, 1, 2]
    logits = [_mtp_logits(model, x) for x in (ids, changed)]
    # (other tokens change the experts' row counts, so the GEMMs may round differently: float noise, nothing more)
    torch.testing.assert_close(logits[0][:, :9], logits[1][:, :9], rtol=0, atol=1e-6)
    assert (logits[0][:, 9] - logits[1][:, 9]).abs().max() > 1e-3
    assert other.loss is not None and base.mtp_loss is not None


def _mtp_logits(model: MoETransformer, ids: torch.Tensor) -> torch.Tensor:
    """Depth-1 logits at every position (predicting token i + 2), through the model's own forward."""
    captured = {}
    handle = model.mtp[0].norm.register_forward_hook(lambda mod, args, result: captured.update(h=result))
    with torch.no_grad():
        model(ids[:, :-1], ids[:, 1:])
    handle.remove()
    return model.lm_head(captured["h"])


@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_gated_deltanet_chunks_compute_the_recurrence(chunk):
    """The chunkwise form the layer runs (one triangular solve per chunk) equals the recurrence step by step, from a
    state and with a sequence that is no multiple of the chunk: outputs, last state and gradients."""
    from moe_lab.model.deltanet import gated_delta_rule

    torch.manual_seed(0)
    B, S, H, K, V = 2, 37, 3, 8, 5
    inputs = [torch.randn(B, S, H, K), torch.randn(B, S, H, K), torch.randn(B, S, H, V)]
    inputs += [-2 * torch.rand(B, S, H), torch.rand(B, S, H), torch.randn(B, H, K, V)]
    results = []
    for c in (0, chunk):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out, state = gated_delta_rule(*leaves, chunk=c)
        (out.square().sum() + state.sum()).backward()
        results.append((out.detach(), state.detach(), [t.grad for t in leaves]))
    (o0, s0, g0), (o1, s1, g1) = results
    torch.testing.assert_close(o1, o0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s1, s0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_hybrid_model_is_causal():
    """Gated DeltaNet blocks (their convolution and recurrence) and gated attention see no later token."""
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=3, n_heads=2, ffn_hidden=64, max_seq_len=64, linear_layers=[0, 2],
        attention_gate=True, norm_offset=True, deltanet_key_dim=8, deltanet_value_dim=8,
        moe=MoEConfig(num_experts=4, expert_hidden=32, capacity_factor=None, eval_capacity_factor=None),
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        assert_causal(MoETransformer(cfg).eval(), batch=2, seq=40, t=23, vocab=64)


def test_the_multi_token_prediction_modules_are_one_part_for_freezing_and_learning_rates():
    """optim.freeze=[mtp] / optim.lr_mult.mtp: every parameter under mtp. is the part `mtp`, none of the model's."""
    from moe_lab.training.module import part_of
    from moe_lab.training.schemas import PARTS

    model = _mtp_model(depth=1)
    parts = {name: part_of(name) for name, _ in model.named_parameters()}
    assert "mtp" in PARTS
    assert {part for name, part in parts.items() if name.startswith("mtp.")} == {"mtp"}
    assert "mtp" not in {part for name, part in parts.items() if not name.startswith("mtp.")}
