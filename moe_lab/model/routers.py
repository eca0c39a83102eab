"""Routers: which experts see which tokens, and with what weight.

Shape legend (suffixes on tensor names):
    T  tokens in the layer's input (batch * sequence, flattened)
    D  d_model
    E  routed experts
    K  experts chosen per token (top_k)

A router is a small module with a nested `Config` dataclass, registered by name with `@register_router`.
Adding a router is one class here (or in a module that imports `register_router`) plus one `conf/router/NAME.yaml`
whose `name` is the registered name. The router computes in float32 whatever the autocast dtype, as every
production MoE does (Megatron-Core, DeepSpeed, HF): bf16 logits make top-k choices noisy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterOutput:
    """What the MoE layer needs from a router. Token-choice routers fill every field."""

    expert_ids_TK: torch.Tensor  # int64, the experts each token chose, best first
    weights_TK: torch.Tensor  # float32, the weights that combine those experts' outputs
    logits_TE: torch.Tensor  # float32, raw gate logits (router z-loss)
    probs_TE: torch.Tensor  # float32, probabilities over all experts (load-balance loss, entropy)


@dataclass
class RouterConfig:
    """Keys every router accepts."""

    # Registered router name (the file name in conf/router/).
    name: str = "topk"
    # Experts per token.
    top_k: int = 2


ROUTERS: dict[str, type["Router"]] = {}


def register_router(name: str) -> Callable[[type["Router"]], type["Router"]]:
    """Class decorator: make a router selectable as `router=NAME`."""

    def wrap(cls: type["Router"]) -> type["Router"]:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is registered twice ({ROUTERS[name].__name__} and {cls.__name__})")
        ROUTERS[name] = cls
        cls.registered_name = name
        return cls

    return wrap


def router_config(node: dict) -> RouterConfig:
    """The Config dataclass of the router a (validated) config node names."""
    node = dict(node)
    name = node.get("name", "topk")
    if name not in ROUTERS:
        raise ValueError(f"model.moe.router.name={name!r} is not a router; choose one of {sorted(ROUTERS)}")
    return ROUTERS[name].Config(**node)


class Router(nn.Module):
    """Base class: a linear gate from d_model to E logits, kept in float32."""

    Config: ClassVar[type[RouterConfig]] = RouterConfig
    registered_name: ClassVar[str] = ""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, init_std: float = 0.02):
        super().__init__()
        if not 1 <= cfg.top_k <= num_experts:
            raise ValueError(f"model.moe.router.top_k={cfg.top_k} must be in 1..num_experts ({num_experts})")
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = cfg.top_k
        # (E, D): stored in float32 even under bf16 autocast; the routing math never leaves float32.
        self.gate_ED = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.gate_ED, std=init_std)

    def gate_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Float32 logits (T, E), computed outside autocast."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.gate_ED.float())

    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        raise NotImplementedError


@dataclass
class TopKRouterConfig(RouterConfig):
    # Renormalise the k chosen weights to sum to 1 (Mixtral does; Qwen-MoE's default does not).
    normalize: bool = True


@register_router("topk")
class TopKRouter(Router):
    """Softmax over all experts, then the top-k (GShard, Lepikhin et al. 2020; Mixtral, Jiang et al. 2024).

    The softmax is taken over all E experts before the top-k, so the load-balance loss sees a distribution
    over every expert; `normalize` then rescales the k chosen weights to sum to one.
    """

    Config = TopKRouterConfig

    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, expert_ids_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.cfg.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(expert_ids_TK, weights_TK, logits_TE, probs_TE)


def build_router(d_model: int, num_experts: int, node: dict, init_std: float = 0.02) -> Router:
    cfg = router_config(node)
    return ROUTERS[cfg.name](d_model, num_experts, cfg, init_std=init_std)
