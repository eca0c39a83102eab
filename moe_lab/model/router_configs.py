"""The routers' settings: one dataclass per router, the schemas behind `conf/router/*.yaml`.

They live apart from the routers themselves (`routers.py`) so that the configuration (Hydra's schemas, the
command-line check, shell completion) needs no torch. Each router class in `routers.py` points at its settings with
`Config = ...`; `register_router` adds the settings of a router defined elsewhere to `ROUTER_CONFIGS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

@dataclass
class RouterConfig:
    """Keys every router accepts; each router's Config adds its own."""

    # Registered router name (the `name` in conf/router/*.yaml).
    name: str = "topk"
    # Experts per token (expert choice: the average number of experts per token).
    top_k: int = 2


@dataclass
class TopKRouterConfig(RouterConfig):
    name: str = "topk"
    # Renormalise the k chosen weights to sum to 1 (Mixtral does; Qwen-MoE's default does not).
    normalize: bool = True
    # softmax over all experts (GShard, Mixtral) or an independent sigmoid per expert (DeepSeek-V3).
    score: str = "softmax"
    # Group-limited routing (DeepSeek-V3 device/node-limited routing): experts form num_groups groups; a token
    # first keeps the topk_groups groups with the highest sum of their top-2 scores, then picks top_k inside them.
    num_groups: int = 1
    topk_groups: int = 1
    # Multiplies the combine weights (DeepSeek-V3's routed_scaling_factor, 2.5 for 256 experts).
    scaling_factor: float = 1.0


@dataclass
class NoisyTopKRouterConfig(RouterConfig):
    name: str = "noisy_topk"
    # Floor of the learned noise scale softplus(x W_noise) (numerical safety of the load estimator).
    min_noise_std: float = 1e-2


@dataclass
class SwitchRouterConfig(RouterConfig):
    name: str = "switch"
    top_k: int = 1
    # Multiplicative input jitter x * U(1 - eps, 1 + eps) in training (Switch Transformer section 2.4).
    jitter_eps: float = 1e-2


@dataclass
class ExpertChoiceRouterConfig(RouterConfig):
    name: str = "expert_choice"
    # false: each expert picks its top-capacity tokens among all tokens of the batch, as the paper. That reads
    # every position of a sequence, so a token's routing depends on later tokens: an LM trained this way sees the
    # future through routing and its validation loss is optimistic.
    # true: each expert picks among the tokens at the same position of the batch's sequences (one batch slice
    # per position), so no token's routing depends on a later position of any sequence.
    causal: bool = False


@dataclass
class HashRouterConfig(RouterConfig):
    name: str = "hash"
    top_k: int = 1
    # Seed of the random hash table: expert = table[token id] (one table per k).
    hash_seed: int = 0


@dataclass
class DomainOracleConfig(RouterConfig):
    name: str = "domain_oracle"
    # Experts per token, all of the token's domain: domain d takes experts (d k + j) mod E, j < k.
    top_k: int = 1


@dataclass
class SinkhornRouterConfig(RouterConfig):
    name: str = "sinkhorn"
    top_k: int = 1
    # Sinkhorn-Knopp normalisation rounds (Megatron-Core's S-BASE router stops at a tolerance; a fixed count keeps
    # the layer free of host synchronisation).
    iterations: int = 20
    # Entropy regularisation of the transport problem, relative to the spread of the logits: the affinities are
    # logits / (std(logits) * temperature). With the raw logits (temperature 1 on an unnormalised scale) the balanced
    # matrix's rows stay soft and their argmax drifts back to the favourite experts: max/mean load 1.4-2.1 measured
    # on a trained tiny model. 0.1 gives 1.04-1.3 there and on skewed random gates; lower is closer to BASE's hard
    # linear assignment but needs more iterations.
    temperature: float = 0.1


@dataclass
class AuxFreeRouterConfig(RouterConfig):
    name: str = "aux_free"
    # Bias step per optimizer step: b += rate * sign(mean load - load) (DeepSeek-V3's gamma = 1e-3).
    bias_update_rate: float = 1e-3
    # Renormalise the k chosen sigmoid scores (DeepSeek-V3 does).
    normalize: bool = True
    scaling_factor: float = 1.0


@dataclass
class SoftRouterConfig(RouterConfig):
    name: str = "soft"
    top_k: int = 0  # ignored: every expert is used


@dataclass
class HierarchicalRouterConfig(RouterConfig):
    name: str = "hierarchical"
    # Experts per token inside each chosen group (top_k) times chosen groups (group_top_k) = experts per token.
    top_k: int = 1
    num_groups: int = 2
    group_top_k: int = 1
    # Renormalise the chosen joint weights p(group) * p(expert | group) to sum to 1.
    normalize: bool = True


# The settings of every router, by registered name (each dataclass's default `name`).
ROUTER_CONFIGS: dict[str, type[RouterConfig]] = {
    cls.name: cls for cls in (TopKRouterConfig, NoisyTopKRouterConfig, SwitchRouterConfig, ExpertChoiceRouterConfig,
                              HashRouterConfig, SinkhornRouterConfig, AuxFreeRouterConfig, SoftRouterConfig,
                              HierarchicalRouterConfig, DomainOracleConfig)}


def router_config(node: RouterConfig | Mapping[str, Any]) -> RouterConfig:
    """The Config of the router that `node` names, filled with that router's defaults.

    `node` is a RouterConfig (the base class holds only the shared keys) or its plain-dict form, as checkpoints store
    it. Raises ValueError naming an unknown router or a key that router does not have.
    """
    values = dataclasses.asdict(node) if dataclasses.is_dataclass(node) else dict(node)
    name = values.get("name", "topk")
    if name not in ROUTER_CONFIGS:
        raise ValueError(f"model.moe.router.name={name!r} is not a router; the routers are {sorted(ROUTER_CONFIGS)} "
                         "(router=NAME picks one)")
    cls = ROUTER_CONFIGS[name]
    if type(node) is cls:
        return node
    keys = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ValueError(f"model.moe.router.{unknown[0]} is not a setting of router={name}; its settings are {keys}")
    return cls(**values)
