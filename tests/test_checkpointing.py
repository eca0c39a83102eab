"""Activation checkpointing (moe_lab/model/checkpointing.py): the gradients of a run without it, the forward's
routing in the recompute (no second draw of noise), and what the forward counted counted once."""

from __future__ import annotations

import pytest
import torch

from moe_lab.model import ModelConfig, MoEConfig, MoETransformer
from moe_lab.model.routers import ROUTERS

ALL = sorted(ROUTERS)
B, S, V = 3, 10, 64


def model(router: str, checkpointing: str, capacity_factor=None, seed: int = 0) -> MoETransformer:
    """A 2-layer MoE transformer of width 32 in training mode; the same weights for every `checkpointing`."""
    torch.manual_seed(seed)
    node = {"name": router, "causal": True} if router == "expert_choice" else {"name": router}
    experts = MoEConfig(
        num_experts=4,
        expert_hidden=32,
        router=node,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
    )
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffn_hidden=64,
        max_seq_len=64,
        moe=experts,
        activation_checkpointing=checkpointing,
    )
    return MoETransformer(cfg).train()


def step(m: MoETransformer, seed: int = 5):
    """One forward + backward of loss + aux losses under a fixed RNG state; what it leaves behind."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S + 1), generator=g)
    torch.manual_seed(seed)
    out = m(ids[:, :-1], ids[:, 1:], domain_B=torch.tensor([0, 1, 0]))
    loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in m.named_buffers() if "pending" in n}
    return out, grads, buffers, torch.get_rng_state()


@pytest.mark.parametrize("mode", ["moe", "block"])
@pytest.mark.parametrize("name", ALL)
def test_checkpointing_gives_the_gradients_and_counts_of_the_run_without_it(name, mode):
    """Every router, exactly (torch.equal, float32): the recompute replays the forward's experts, draws its noise
    from the forward's RNG state and leaves the process's stream where the forward left it, and routers that count
    load outside the gradient (aux-loss-free bias, identity experts, ReLU routing) count each token once."""
    capacity = 1.0 if ROUTERS[name].Config.uses_capacity else None
    plain, checkpointed = model(name, "none", capacity), model(name, mode, capacity)
    out_a, grads_a, buffers_a, rng_a = step(plain)
    out_b, grads_b, buffers_b, rng_b = step(checkpointed)
    assert torch.equal(out_a.loss, out_b.loss)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n
    assert buffers_a.keys() == buffers_b.keys()
    for n in buffers_a:
        assert torch.equal(buffers_a[n], buffers_b[n]), n
    assert torch.equal(rng_a, rng_b)  # no second draw from the process's stream
    for layer in out_a.moe:  # the routing statistics are the forward's, once
        assert torch.equal(out_a.moe[layer].tokens_per_expert_E, out_b.moe[layer].tokens_per_expert_E)
        assert set(out_a.moe[layer].losses) == set(out_b.moe[layer].losses)


@pytest.mark.parametrize("name", ["noisy_topk", "switch"])
def test_a_noisy_router_does_not_draw_again_in_the_recompute(name, monkeypatch):
    """The recompute replays the experts the forward took (it never routes live again), and its noise comes from
    the RNG state the forward had: with that state not restored (preserve_rng_state=False), the recompute's noise
    differs and so do the gradients, which is what restoring it prevents (the test above: equal gradients)."""
    import torch.utils.checkpoint as checkpoint_module

    from moe_lab.model.moe import MoELayer

    plain, checkpointed = model(name, "none"), model(name, "block")
    _, grads_a, _, _ = step(plain)
    modes: list[tuple[bool, str]] = []
    route = MoELayer.route

    def spied(layer, inputs):
        modes.append((torch.is_grad_enabled(), layer.tape_mode))
        return route(layer, inputs)

    real = checkpoint_module.checkpoint
    monkeypatch.setattr(MoELayer, "route", spied)
    monkeypatch.setattr(
        "moe_lab.model.checkpointing.checkpoint",
        lambda fn, *args, **kwargs: real(fn, *args, **{**kwargs, "preserve_rng_state": False}),
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S + 1), generator=g)
    torch.manual_seed(5)
    out = checkpointed(ids[:, :-1], ids[:, 1:])
    assert [mode for _, mode in modes] == ["pin", "pin"]  # two MoE layers: live selection, then its replay
    torch.manual_seed(99)  # another stream for the recompute's noise
    (out.loss + out.aux_loss).backward()
    assert [mode for _, mode in modes[2:]] == ["pinned", "pinned"]  # the recompute replays, never routes live
    assert any(not torch.equal(p.grad, grads_a[n]) for n, p in checkpointed.named_parameters() if p.grad is not None)


def test_checkpointing_inside_routing_replay_replays_the_trace_in_the_recompute():
    """Under routing replay (training on another model's trace), the recompute replays the same trace entry, after
    the trainer's replay context has closed."""
    source, plain, checkpointed = model("topk", "none", seed=3), model("topk", "none"), model("topk", "block")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S + 1), generator=g)
    with torch.no_grad(), source.record_routing() as tape:
        source(ids[:, :-1])
    grads = []
    for m in (plain, checkpointed):
        with m.replay_routing(tape):
            out = m(ids[:, :-1], ids[:, 1:])
        (out.loss + out.aux_loss).backward()  # the recompute runs here, outside the replay context
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_evaluation_and_no_grad_keep_no_checkpoint_and_the_setting_is_checked(make_cfg):
    from moe_lab.training.schemas import ConfigError, validate

    m = model("topk", "block").eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S + 1), generator=g)
    with torch.no_grad():
        assert torch.equal(m(ids[:, :-1]).logits, model("topk", "none").eval()(ids[:, :-1]).logits)
    with pytest.raises(ConfigError, match="activation_checkpointing='layers' is not one of none, moe, block"):
        validate(make_cfg("model.activation_checkpointing=layers"))
    with pytest.raises(ConfigError, match="compile=true does not go with model.activation_checkpointing=moe"):
        validate(make_cfg("model.activation_checkpointing=moe", "compile=true"))
    run = validate(make_cfg("model.activation_checkpointing=block", fast=False))
    assert run.compile is False
