"""Auxiliary router losses, one MoE layer at a time. Each returns an unweighted scalar; the weights are
`model.moe.aux_loss.*` and the model averages each loss over its MoE layers (never over concatenated layers).

Shape legend: T tokens, B sequences, S positions, E experts, K experts per token, N routing slots.
"""

from __future__ import annotations

from typing import Optional

import torch


def load_balance_loss(
    probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, num_slots: Optional[int] = None
) -> torch.Tensor:
    """Switch/GShard load-balancing loss `E * sum_i f_i * P_i` (Fedus et al. 2021, eq. 4; Lepikhin et al. 2020).

    f_i is the fraction of the routed token slots that chose expert i (counted before capacity drops; not
    differentiable), P_i the mean router probability of expert i. It equals 1 when routing is uniform and grows to E
    when one expert takes everything. `probs_TE` must already be probabilities: a softmax applied to them again is
    the double-softmax bug of transformers issue 45120 (it flattens P and weakens the loss). `num_slots`, the slots
    the counts sum to where that is known without counting (T x K for a fixed top-k), saves two operations a call.
    """
    num_experts = probs_TE.shape[-1]
    p_E = probs_TE.float().mean(dim=0)
    counts_E = tokens_per_expert_E.detach().to(p_E.dtype)
    if num_slots is None:
        return num_experts * torch.dot(counts_E, p_E) / counts_E.sum().clamp(min=1)
    return torch.dot(counts_E, p_E) * (num_experts / max(num_slots, 1))


def slot_load_balance_loss(
    probs_TE: torch.Tensor, expert_N: torch.Tensor, active_N: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`load_balance_loss` from the routing slots instead of the counts: sum_i f_i P_i = (1/N) sum_n P_{expert_n},
    without a histogram (the dropless dispatch makes none). `active_N` marks the slots that go to an expert."""
    num_experts = probs_TE.shape[-1]
    p_E = probs_TE.float().mean(dim=0)
    if active_N is None:
        return p_E.index_select(0, expert_N).sum() * (num_experts / max(expert_N.numel(), 1))
    p_N = p_E.index_select(0, expert_N.clamp(max=num_experts - 1)) * active_N
    return num_experts * p_N.sum() / active_N.sum().clamp(min=1)


def sequence_load_balance_loss(
    probs_TE: torch.Tensor,
    expert_N: torch.Tensor,
    token_N: torch.Tensor,
    batch_size: int,
    active_N: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V2 eq. 21; DeepSeek-V3 eq. 17-20): the Switch loss within each sequence,
    averaged over sequences, so no single sequence can pile onto few experts. 1 when uniform, like the Switch loss.
    `expert_N`, `token_N` are the routing slots (token n's expert); tokens are batch-major, S per sequence;
    `active_N` marks the slots that go to an expert, where some go to none (variable experts per token)."""
    T, E = probs_TE.shape
    S = T // batch_size
    ones_N = torch.ones(expert_N.numel(), device=probs_TE.device) if active_N is None else active_N.float()
    counts_BE = torch.zeros(batch_size * E, device=probs_TE.device)
    counts_BE.scatter_add_(0, (token_N // S) * E + expert_N.clamp(max=E - 1), ones_N)
    slots_B1 = counts_BE.view(batch_size, E).sum(1, keepdim=True).clamp(min=1)  # K * S with a fixed k
    f_BE = counts_BE.view(batch_size, E) * E / slots_B1
    p_BE = probs_TE.float().view(batch_size, S, E).mean(dim=1)
    return (f_BE.detach() * p_BE).sum(-1).mean()


def global_load_balance_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Global-batch balance loss (Qiu et al. 2025, arXiv 2501.11873; Megatron `global_aux_loss`): the Switch loss with
    f counted over every data-parallel rank's tokens, so experts may specialise per micro-batch while staying
    balanced over the global batch. Without torch.distributed it equals the Switch loss."""
    counts_E = tokens_per_expert_E.detach().float().clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts_E)
    return load_balance_loss(probs_TE, counts_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss `mean_t logsumexp(logits_t)^2` (Zoph et al. 2022, ST-MoE eq. 5): keeps logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, variance / mean^2 (population variance, as Shazeer et al.'s code)."""
    x_E = x_E.float()
    return x_E.var(unbiased=False) / (x_E.mean().square() + 1e-10)


def importance_loss(weight_N: torch.Tensor, expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Shazeer et al. 2017 eq. 6-7: CV(Importance)^2, Importance_i = sum of gate weights expert i gets over the batch
    (`weight_N`, `expert_N`: the routing slots; a slot of no expert, id E, weighs nothing)."""
    importance_E = torch.zeros(num_experts + 1, device=weight_N.device, dtype=torch.float32)
    importance_E = importance_E.scatter_add(0, expert_N, weight_N.float())[:num_experts]
    return cv_squared(importance_E)


def load_loss(load_estimate_E: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. 2017 eq. 10-11: CV(Load)^2 of the smooth load estimator of noisy top-k gating."""
    return cv_squared(load_estimate_E)
