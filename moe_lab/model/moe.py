"""The MoE layer: router -> sort-based token permutation -> grouped experts -> weighted combine.

Shape legend:
    B  batch           S  sequence          T  tokens = B * S
    D  d_model         E  routed experts    K  experts per token (top_k)
    N  token slots = K * T, ordered k-major: slot n is token n % T's (n // T)-th choice, so every token's
       first choice comes before any token's second choice (GShard's priority for capacity)
    R  rows of the expert input, = N: the slots sorted by expert, kept slots first, dropped ones after

The fast path has no Python loop over tokens or experts and no host-device synchronisation: counts are a
scatter-add, offsets a cumsum, the permutation one stable argsort, and capacity a comparison, so the layer
runs the same on CPU and GPU and under `torch.compile`. `implementation="loop"` is the plain per-expert
reference the tests hold the fast path to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from moe_lab.model.config import MoEConfig
from moe_lab.model.experts import FeedForward, GroupedExperts
from moe_lab.model.losses import load_balance_loss, router_z_loss
from moe_lab.model.routers import RouterOutput, build_router


@dataclass
class MoELayerOutput:
    """Per-layer losses (with gradients) and routing statistics (detached, still on device: no sync)."""

    load_balance_loss: torch.Tensor  # scalar
    z_loss: torch.Tensor  # scalar
    tokens_per_expert_E: torch.Tensor  # float32, routed token slots per expert, before capacity drops
    dropped_slots: torch.Tensor  # float32 scalar, token slots that overflowed their expert's capacity
    router_entropy: torch.Tensor  # float32 scalar, mean per-token entropy of the router's probabilities (nats)


def expert_capacity(capacity_factor: Optional[float], num_tokens: int, top_k: int, num_experts: int) -> Optional[int]:
    """Token slots one expert may take: ceil(cf * T * K / E) (Switch Transformer); None = dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


@dataclass
class Dispatch:
    """Where every token slot goes: built once per layer call, used to gather inputs and scatter outputs."""

    row_slot_R: torch.Tensor  # int64, the slot in each row of the expert input
    slot_row_N: torch.Tensor  # int64, inverse permutation: the row of each slot
    offs_E: torch.Tensor  # int32, cumulative rows per expert (the grouped GEMM's group ends)
    tokens_per_expert_E: torch.Tensor  # int64, routed slots per expert before capacity
    row_kept_R: Optional[torch.Tensor]  # bool, rows under capacity; None when dropless (all kept)
    dropped_slots: torch.Tensor  # int64 scalar


def build_dispatch(expert_ids_TK: torch.Tensor, num_experts: int, capacity: Optional[int]) -> Dispatch:
    """Sort token slots by expert (stable, so priority order survives) and apply the capacity limit."""
    num_tokens, top_k = expert_ids_TK.shape
    device = expert_ids_TK.device
    expert_N = expert_ids_TK.t().reshape(-1)  # (K, T) -> (N,): k-major priority order
    num_slots = expert_N.numel()
    # Histogram by scatter-add: torch.bincount would synchronise with the host to learn max(input).
    tokens_per_expert_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
    tokens_per_expert_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    order_N = torch.argsort(expert_N, stable=True)  # slots grouped by expert, priority order within each
    arange_N = torch.arange(num_slots, device=device)

    if capacity is None or capacity >= num_slots:
        row_slot_R = order_N
        offs_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        row_kept_R = None
        dropped = torch.zeros((), dtype=torch.int64, device=device)
    else:
        sorted_expert_N = expert_N[order_N]
        starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
        position_N = arange_N - starts_E[sorted_expert_N]  # place in the expert's queue
        keep_N = position_N < capacity
        kept_E = tokens_per_expert_E.clamp(max=capacity)
        kept_starts_E = torch.cumsum(kept_E, 0) - kept_E
        num_kept = kept_E.sum()
        # Kept slots go to their expert's block of rows; dropped slots are parked after all kept rows, where the
        # grouped GEMM (which stops at offs[-1]) never reads them.
        dropped_rank_N = torch.cumsum(~keep_N, 0) - 1
        dest_N = torch.where(keep_N, kept_starts_E[sorted_expert_N] + position_N, num_kept + dropped_rank_N)
        row_slot_R = torch.empty_like(order_N).scatter_(0, dest_N, order_N)
        offs_E = torch.cumsum(kept_E, 0).to(torch.int32)
        row_kept_R = arange_N < num_kept
        dropped = num_slots - num_kept
    slot_row_N = torch.empty_like(row_slot_R).scatter_(0, row_slot_R, arange_N)
    return Dispatch(row_slot_R, slot_row_N, offs_E, tokens_per_expert_E, row_kept_R, dropped)


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN (Shazeer et al. 2017), token-choice routing, optional shared experts."""

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02, out_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.router = build_router(d_model, cfg.num_experts, cfg.router, init_std=init_std)
        self.top_k = self.router.top_k
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_hidden, cfg.activation,
                                      init_std=init_std, out_std=out_std)
        self.shared = (
            FeedForward(d_model, cfg.num_shared * cfg.expert_hidden, cfg.activation, init_std, out_std)
            if cfg.num_shared > 0 else None
        )

    def capacity(self, num_tokens: int) -> Optional[int]:
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        return expert_capacity(factor, num_tokens, self.top_k, self.num_experts)

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, MoELayerOutput]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        token_ids_T = token_ids_BS.reshape(B * S) if token_ids_BS is not None else None
        routing = self.router(x_TD, token_ids_T)
        capacity = self.capacity(B * S)
        if self.cfg.implementation == "loop":
            y_TD, tokens_per_expert_E, dropped = self._forward_loop(x_TD, routing, capacity)
        else:
            y_TD, tokens_per_expert_E, dropped = self._forward_grouped(x_TD, routing, capacity)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        with torch.no_grad():
            entropy = torch.special.entr(routing.probs_TE).sum(-1).mean()
        out = MoELayerOutput(
            load_balance_loss=load_balance_loss(routing.probs_TE, tokens_per_expert_E),
            z_loss=router_z_loss(routing.logits_TE),
            tokens_per_expert_E=tokens_per_expert_E.detach().float(),
            dropped_slots=dropped.detach().float(),
            router_entropy=entropy,
        )
        return y_TD.view(B, S, D), out

    def _forward_grouped(self, x_TD: torch.Tensor, routing: RouterOutput, capacity: Optional[int]):
        T, D = x_TD.shape
        K = routing.expert_ids_TK.shape[1]
        dispatch = build_dispatch(routing.expert_ids_TK, self.num_experts, capacity)
        x_RD = x_TD[dispatch.row_slot_R % T]  # gather: slot n holds token n % T
        if dispatch.row_kept_R is not None:
            # Rows past the last group are never computed; zeroing them also stops their (undefined) gradients.
            x_RD = torch.where(dispatch.row_kept_R[:, None], x_RD, 0.0)
        y_RD = self.experts(x_RD, dispatch.offs_E)
        if dispatch.row_kept_R is not None:
            y_RD = torch.where(dispatch.row_kept_R[:, None], y_RD, 0.0)  # dropped slots: FFN output zero
        y_KTD = y_RD[dispatch.slot_row_N].view(K, T, D)  # back to slot order (one gather, no atomics)
        weights_KT1 = routing.weights_TK.t().unsqueeze(-1).to(y_KTD.dtype)
        y_TD = (y_KTD * weights_KT1).sum(dim=0)
        return y_TD.to(x_TD.dtype), dispatch.tokens_per_expert_E, dispatch.dropped_slots

    def _forward_loop(self, x_TD: torch.Tensor, routing: RouterOutput, capacity: Optional[int]):
        """Reference implementation: one expert at a time, boolean masks, no permutation tricks."""
        T, D = x_TD.shape
        expert_KT = routing.expert_ids_TK.t()
        y_TD = torch.zeros_like(x_TD)
        tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device=x_TD.device)
        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        for expert in range(self.num_experts):
            slots = (expert_KT == expert).reshape(-1).nonzero().squeeze(-1)  # k-major priority order
            tokens_per_expert[expert] = slots.numel()
            if capacity is not None and slots.numel() > capacity:
                dropped += slots.numel() - capacity
                slots = slots[:capacity]
            token, choice = slots % T, slots // T
            out = self.experts.expert_forward(expert, x_TD[token])
            weight = routing.weights_TK[token, choice].unsqueeze(-1)
            y_TD = y_TD.index_add(0, token, (out * weight.to(out.dtype)).to(x_TD.dtype))
        return y_TD, tokens_per_expert, dropped
