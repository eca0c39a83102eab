"""Auxiliary router losses, one MoE layer at a time.

Shape legend: T tokens, E experts.
"""

from __future__ import annotations

import torch


def load_balance_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss `E * sum_i f_i * P_i` (Fedus et al. 2021, eq. 4; Lepikhin et al. 2020).

    f_i is the fraction of the layer's routed token slots that chose expert i (T * top_k slots, counted before
    capacity drops; not differentiable), P_i the mean router probability of expert i. It equals 1 when routing
    is uniform and grows to E when one expert takes everything. `probs_TE` must already be probabilities:
    applying softmax to them again is the double-softmax bug of transformers issue 45120.
    """
    num_experts = probs_TE.shape[-1]
    f_E = tokens_per_expert_E.float() / tokens_per_expert_E.sum().clamp(min=1)
    p_E = probs_TE.float().mean(dim=0)
    return num_experts * (f_E.detach() * p_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss `mean_t logsumexp(logits_t)^2` (Zoph et al. 2022, ST-MoE eq. 5): keeps logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
