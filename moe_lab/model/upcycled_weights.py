"""Upcycling: the weights of an MoE model made from a dense one.

Given the dense model's weights and the MoE model's settings (the same backbone; MoE FFNs in the layers the settings
choose), every weight but the experts' and the routers' is the dense model's, and the experts come from the dense
FFN of their layer:

    copy      sparse upcycling (Komatsuzaki et al. 2022): every expert is a copy of the dense FFN, the router is
              freshly initialised. With top-k weights renormalised to sum to 1 (and no token dropped), the MoE
              computes the dense function exactly: sum_k w_k FFN(x) = FFN(x).
    granular  fine-grained upcycling (He et al. 2024; Megatron-Core's `moe_upcycling_granularity`): the dense FFN's
              F hidden units are cut into G shards of F/G, and the E experts are E/G copies of the G shards. Expert
              e is shard e % G of copy e // G; its down projection is scaled by G, and the G experts of a copy share
              one router row ("virtual group" initialisation), so a token picks whole copies: with top_k a multiple
              of G and weights renormalised, the output is sum_copies w_c G * (1/G) * FFN(x) = FFN(x), exact again.
    drop      Drop-Upcycling (Nakamura et al. 2025): copies, then in each expert a share `drop_ratio` of its hidden
              units (chosen at random, differently per expert) is re-initialised from a normal distribution with
              the mean and std of the dense weights it replaces. The experts start diverse; the dense function is
              given up on purpose.

Shape legend: E experts, F dense FFN hidden units, Fe = F / G expert hidden units, D d_model.
"""

from __future__ import annotations

import dataclasses

import torch

from moe_lab.model.config import ModelConfig
from moe_lab.model.gpt import MoETransformer

METHODS = ("copy", "granular", "drop")


def moe_settings(dense: ModelConfig, moe: ModelConfig, method: str, granularity: int = 1) -> ModelConfig:
    """The upcycled model's settings: the dense model's backbone with `moe`'s MoE settings, its experts as wide as
    the dense FFN / granularity. ValueError names what does not fit."""
    if method not in METHODS:
        raise ValueError(f"upcycle.method={method!r}; choose one of {', '.join(METHODS)}")
    if dense.moe.enabled:
        raise ValueError(
            "the model to upcycle is already an MoE (model.init_from names a dense model: a moe-lab "
            "run with experts=dense, or a Hugging Face Llama, Qwen2 or Qwen3); to continue an MoE use "
            "ckpt_path"
        )
    G = granularity if method == "granular" else 1
    if G < 1 or dense.ffn_hidden % G:
        raise ValueError(f"upcycle.granularity={G} must divide the dense FFN's {dense.ffn_hidden} hidden units")
    if moe.moe.num_experts % G:
        raise ValueError(f"model.moe.num_experts={moe.moe.num_experts} must be a multiple of upcycle.granularity={G}")
    if moe.moe.num_shared:
        raise ValueError("upcycling into shared experts is not supported yet: set model.moe.num_shared=0")
    if moe.moe.latent_dim is not None or moe.moe.expert_bias:
        raise ValueError(
            "a dense FFN is not a latent or biased expert: upcycle with model.moe.latent_dim=null and "
            "model.moe.expert_bias=false"
        )
    if moe.moe.activation != "swiglu":
        raise ValueError(
            f"model.moe.activation={moe.moe.activation}: the dense FFN is SwiGLU; upcycled experts are "
            "SwiGLU too (model.moe.activation=swiglu)"
        )
    settings = dataclasses.replace(
        dense,
        moe=dataclasses.replace(moe.moe, enabled=True, expert_hidden=dense.ffn_hidden // G),
        init_from=moe.init_from,
        name=f"{dense.name}-upcycled",
    )
    settings.check()
    return settings


def upcycled_state_dict(
    dense_state: dict[str, torch.Tensor],
    dense: ModelConfig,
    cfg: ModelConfig,
    method: str,
    granularity: int = 1,
    drop_ratio: float = 0.5,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The state dict of `MoETransformer(cfg)` upcycled from a dense model's state dict (see the module docstring).
    Routers start from the MoE model's own initialisation (seeded by `seed`)."""
    torch.manual_seed(seed)
    target = MoETransformer(cfg)  # fresh routers (and the shapes of everything)
    state = {k: v.clone() for k, v in target.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    G = granularity if method == "granular" else 1
    for name, tensor in dense_state.items():
        if ".ffn." not in name or not cfg.is_moe_layer(int(name.split(".")[1])):
            if name not in state:
                raise ValueError(f"the dense model's weight {name} has no place in the MoE model")
            state[name] = tensor.detach().clone().to(state[name].dtype)
    for layer in cfg.moe_layers:
        p = f"blocks.{layer}.ffn."
        w_in_2FD, w_out_DF = dense_state[p + "w_in.weight"], dense_state[p + "w_out.weight"]
        F = w_out_DF.shape[1]
        Fe = F // G
        gate_FD, up_FD = w_in_2FD[:F], w_in_2FD[F:]
        E = cfg.moe.num_experts
        w_in, w_out = [], []
        for e in range(E):
            shard = slice((e % G) * Fe, (e % G + 1) * Fe)
            gate, up, down = gate_FD[shard].clone(), up_FD[shard].clone(), w_out_DF[:, shard].clone() * G
            if method == "drop":
                dropped = torch.randperm(Fe, generator=generator)[: round(drop_ratio * Fe)]
                gate[dropped] = _like(gate_FD, (len(dropped), gate.shape[1]), generator)
                up[dropped] = _like(up_FD, (len(dropped), up.shape[1]), generator)
                down[:, dropped] = _like(w_out_DF, (down.shape[0], len(dropped)), generator)
            w_in.append(torch.cat([gate, up]))
            w_out.append(down)
        state[p + "experts.w_in_EGFD"] = torch.stack(w_in)
        state[p + "experts.w_out_EDF"] = torch.stack(w_out)
        if G > 1 and p + "router.gate_ED" in state:  # virtual groups: the shards of a copy share a router row
            gate_ED = state[p + "router.gate_ED"]
            state[p + "router.gate_ED"] = gate_ED[torch.arange(E) // G * G].clone()
    return state


def _like(weights: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Fresh values with the mean and std of `weights` (Drop-Upcycling's re-initialisation)."""
    mean, std = float(weights.float().mean()), float(weights.float().std())
    return (torch.randn(shape, generator=generator) * std + mean).to(weights.dtype)
