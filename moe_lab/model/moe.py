"""The MoE layer: router -> sort-based token permutation -> grouped experts -> weighted combine.

Shape legend:
    B  batch           S  sequence          T  tokens = B * S
    D  d_model         E  routed experts    K  experts per token (top_k)       C  tokens per expert
    N  token slots = K * T, ordered k-major: slot n is token n % T's (n // T)-th choice, so every token's
       first choice comes before any token's second choice (GShard's priority for capacity)
    R  rows of the expert input, = N: the slots sorted by expert, kept slots first, dropped ones after

The fast path has no Python loop over tokens or experts and no host-device synchronisation: counts are a
scatter-add, offsets a cumsum, the permutation one stable argsort (two for the probability drop policy), and
capacity a comparison, so the layer runs the same on CPU and GPU and under `torch.compile`.
`implementation="loop"` is the plain per-expert reference the tests hold the fast path to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from moe_lab.model.config import MoEConfig
from moe_lab.model.experts import FeedForward, GroupedExperts
from moe_lab.model.losses import (global_load_balance_loss, importance_loss, load_balance_loss, load_loss,
                                  router_z_loss, sequence_load_balance_loss)
from moe_lab.model.routers import RouterOutput, build_router


@dataclass
class MoELayerOutput:
    """Per-layer losses (with gradients) and routing statistics (detached, still on device: no sync)."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted aux losses, by name
    tokens_per_expert_E: Optional[torch.Tensor] = None  # float32, routed token slots per expert, before drops
    dropped_slots: Optional[torch.Tensor] = None  # float32 scalar, slots that overflowed capacity / went unrouted
    router_entropy: Optional[torch.Tensor] = None  # float32 scalar, mean per-token entropy of router probs (nats)
    topk_mass: Optional[torch.Tensor] = None  # float32 scalar, mean router probability mass of a token's experts
    # Every routing decision (slot n: expert_N[n] took token_N[n]), before capacity: for expert x domain tables.
    expert_N: Optional[torch.Tensor] = None
    token_N: Optional[torch.Tensor] = None


def expert_capacity(capacity_factor: Optional[float], num_tokens: int, top_k: int, num_experts: int,
                    min_capacity: int = 0) -> Optional[int]:
    """Token slots one expert may take: ceil(cf * T * K / E) (Switch Transformer), at least min_capacity; None =
    dropless."""
    if capacity_factor is None:
        return None
    return max(math.ceil(capacity_factor * num_tokens * top_k / num_experts), min_capacity)


@dataclass
class Dispatch:
    """Where every token slot goes: built once per layer call, used to gather inputs and scatter outputs."""

    row_slot_R: torch.Tensor  # int64, the slot in each row of the expert input
    offs_E: torch.Tensor  # int32, cumulative rows per expert (the grouped GEMM's group ends)
    tokens_per_expert_E: torch.Tensor  # int64, routed slots per expert before capacity
    row_kept_R: Optional[torch.Tensor]  # bool, rows under capacity; None when dropless (all kept)
    dropped_slots: torch.Tensor  # int64 scalar


def build_dispatch(expert_ids_TK: torch.Tensor, num_experts: int, capacity: Optional[int],
                   priority_TK: Optional[torch.Tensor] = None) -> Dispatch:
    """Sort token slots by expert and apply the capacity limit.

    Within an expert, slots keep k-major order (drop policy "position"), or, given `priority_TK`, the highest
    priority first (drop policy "probability"); over capacity, the last ones are dropped.
    """
    device = expert_ids_TK.device
    expert_N = expert_ids_TK.t().reshape(-1)  # (K, T) -> (N,): k-major priority order
    num_slots = expert_N.numel()
    # Histogram by scatter-add: torch.bincount would synchronise with the host to learn max(input).
    tokens_per_expert_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
    tokens_per_expert_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    if priority_TK is None:
        order_N = torch.argsort(expert_N, stable=True)  # grouped by expert, k-major order within each
    else:
        by_priority_N = torch.argsort(-priority_TK.t().reshape(-1), stable=True)
        order_N = by_priority_N[torch.argsort(expert_N[by_priority_N], stable=True)]
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
    return Dispatch(row_slot_R, offs_E, tokens_per_expert_E, row_kept_R, dropped)


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN (Shazeer et al. 2017) with any registered router and optional shared experts."""

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02, out_std: float = 0.02,
                 vocab_size: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.router = build_router(d_model, cfg.num_experts, cfg.router, init_std=init_std, vocab_size=vocab_size)
        self.top_k = self.router.top_k
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_hidden, cfg.activation,
                                      init_std=init_std, out_std=out_std)
        self.shared = (
            FeedForward(d_model, cfg.num_shared * cfg.expert_hidden, cfg.activation, init_std, out_std)
            if cfg.num_shared > 0 else None
        )
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if self.shared is not None and cfg.shared_gate else None
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=init_std)
        self.ep = None  # ExpertParallelGroups once shard_experts() ran

    def shard_experts(self, groups) -> None:
        """Expert parallelism: keep this rank's E / P experts; tokens reach them by all-to-all (moe_lab/parallel.py)."""
        if groups.ep_size > 1 and self.ep is None:
            self.experts.shard(groups.ep_rank, groups.ep_size, groups.ep_group)
            self.ep = groups

    @property
    def capacity_factor(self) -> Optional[float]:
        return self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor

    def capacity(self, num_tokens: int) -> Optional[int]:
        if not self.router.uses_capacity:
            return None
        return expert_capacity(self.capacity_factor, num_tokens, self.top_k, self.num_experts, self.cfg.min_capacity)

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, MoELayerOutput]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        token_ids_T = token_ids_BS.reshape(B * S) if token_ids_BS is not None else None
        routing = self.router(x_TD, token_ids_T, batch_size=B, capacity_factor=self.capacity_factor)
        if routing.token_ids_EC is not None:
            y_TD, tokens_per_expert_E, dropped = self._forward_expert_choice(x_TD, routing)
        elif self.ep is not None:
            capacity = self.capacity(B * S * self.ep.ep_size)  # per expert, over the whole EP group's tokens
            y_TD, tokens_per_expert_E, dropped = self._forward_expert_parallel(x_TD, routing, capacity)
        elif self.cfg.implementation == "loop":
            y_TD, tokens_per_expert_E, dropped = self._forward_loop(x_TD, routing, self.capacity(B * S))
        else:
            y_TD, tokens_per_expert_E, dropped = self._forward_grouped(x_TD, routing, self.capacity(B * S))
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        out = MoELayerOutput(losses=self._losses(routing, tokens_per_expert_E, B),
                             tokens_per_expert_E=tokens_per_expert_E.detach().float(),
                             dropped_slots=dropped.detach().float())
        with torch.no_grad():
            out.expert_N, out.token_N = self._assignment(routing, B * S)
            if routing.probs_TE is not None:
                out.router_entropy = torch.special.entr(routing.probs_TE).sum(-1).mean()
                chosen_N = routing.probs_TE[out.token_N, out.expert_N]
                out.topk_mass = torch.zeros(B * S, device=x_TD.device).index_add_(0, out.token_N, chosen_N).mean()
            else:  # a fixed table: no distribution over experts
                out.router_entropy = torch.zeros((), device=x_TD.device)
        return y_TD.view(B, S, D), out

    def _assignment(self, routing: RouterOutput, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert_N, token_N) of every routing decision, k-major for token choice, expert-major for expert choice."""
        if routing.token_ids_EC is not None:
            E, C = routing.token_ids_EC.shape
            expert_N = torch.arange(E, device=routing.token_ids_EC.device).repeat_interleave(C)
            return expert_N, routing.token_ids_EC.reshape(-1)
        expert_N = routing.expert_ids_TK.t().reshape(-1)
        return expert_N, torch.arange(expert_N.numel(), device=expert_N.device) % num_tokens

    def _losses(self, routing: RouterOutput, tokens_per_expert_E: torch.Tensor, batch_size: int
                ) -> dict[str, torch.Tensor]:
        """The unweighted aux losses this router supports: the Switch loss and z-loss always (they are logged),
        the others only when weighted (validation rejects a weight on a loss the router cannot have)."""
        if routing.probs_TE is None:  # no learned gate (hash routing): nothing to balance by gradient
            return {}
        weights = self.cfg.aux_loss
        losses = {"load_balance": load_balance_loss(routing.probs_TE, tokens_per_expert_E),
                  "z_loss": routing.z_loss if routing.z_loss is not None else router_z_loss(routing.logits_TE)}
        if weights.seq_load_balance > 0:
            losses["seq_load_balance"] = sequence_load_balance_loss(routing.probs_TE, routing.expert_ids_TK,
                                                                    batch_size)
        if weights.global_load_balance > 0:
            losses["global_load_balance"] = global_load_balance_loss(routing.probs_TE, tokens_per_expert_E)
        if weights.importance > 0:
            ids, w = ((routing.expert_ids_TK, routing.weights_TK) if routing.expert_ids_TK is not None
                      else (torch.arange(self.num_experts, device=routing.weights_EC.device)[:, None]
                            .expand_as(routing.weights_EC), routing.weights_EC))
            losses["importance"] = importance_loss(w, ids, self.num_experts)
        if weights.load > 0 and routing.load_estimate_E is not None:
            losses["load"] = load_loss(routing.load_estimate_E)
        return losses

    def _priority(self, routing: RouterOutput) -> Optional[torch.Tensor]:
        return routing.weights_TK if self.cfg.drop_policy == "probability" else None

    def _forward_grouped(self, x_TD: torch.Tensor, routing: RouterOutput, capacity: Optional[int]):
        """One gather of the token rows in expert order, the grouped experts (routing weights applied inside), and
        one scatter-add back to the tokens: two (N, D) buffers forward and two backward, nothing else that size."""
        T, D = x_TD.shape
        dispatch = build_dispatch(routing.expert_ids_TK, self.num_experts, capacity, self._priority(routing))
        token_R = dispatch.row_slot_R % T  # slot n holds token n % T
        weight_R = routing.weights_TK.t().reshape(-1).index_select(0, dispatch.row_slot_R)
        x_src = x_TD
        if dispatch.row_kept_R is not None:
            # Dropped slots read a zero row and write to a spare row T that is discarded, with weight 0: the grouped
            # GEMM leaves rows past its last group undefined, and this keeps them away from outputs and gradients.
            token_R = torch.where(dispatch.row_kept_R, token_R, T)
            weight_R = torch.where(dispatch.row_kept_R, weight_R, 0.0)
            x_src = torch.cat([x_TD, x_TD.new_zeros(1, D)])
        x_RD = x_src.index_select(0, token_R)  # gather (backward: index_add)
        y_RD = self.experts(x_RD, dispatch.offs_E, weight_R)
        y_TD = y_RD.new_zeros(x_src.shape[0], D).index_add(0, token_R, y_RD)  # combine the k choices of each token
        return y_TD[:T].to(x_TD.dtype), dispatch.tokens_per_expert_E, dispatch.dropped_slots

    def _forward_expert_parallel(self, x_TD: torch.Tensor, routing: RouterOutput, capacity: Optional[int]):
        """Token choice with the experts spread over an EP group of P ranks (El = E / P experts each).

        Capacity is per expert over the group's tokens, and which slots it keeps is decided exactly as one device
        holding the whole group's batch (rank-major token order) would: the routing of the group is all-gathered and
        `build_dispatch` runs on it. Kept slots travel to their expert's rank by all-to-all (row counts first), run
        through the local experts as one grouped GEMM, and come back the same way.
        """
        from moe_lab.parallel import all_gather, all_to_all

        groups = self.ep
        group, P, rank = groups.ep_group, groups.ep_size, groups.ep_rank
        T, D = x_TD.shape
        K = routing.expert_ids_TK.shape[1]
        E = self.num_experts
        El = E // P
        expert_N = routing.expert_ids_TK.t().reshape(-1)  # k-major local slots
        N = expert_N.numel()
        tokens_per_expert_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device)
        tokens_per_expert_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))
        if capacity is None:
            keep_N = torch.ones(N, dtype=torch.bool, device=x_TD.device)
        else:
            ids_PTK = all_gather(routing.expert_ids_TK, group)
            priority = self._priority(routing)
            priority_PTK = all_gather(priority, group) if priority is not None else None
            group_dispatch = build_dispatch(ids_PTK.reshape(P * T, K), E, capacity,
                                            priority_PTK.reshape(P * T, K) if priority_PTK is not None else None)
            keep_G = torch.ones(K * P * T, dtype=torch.bool, device=x_TD.device)
            if group_dispatch.row_kept_R is not None:
                keep_G = keep_G.scatter(0, group_dispatch.row_slot_R, group_dispatch.row_kept_R)
            # Local slot (k, t) is slot k * (P * T) + rank * T + t of the group's k-major order.
            local_G = (torch.arange(K, device=x_TD.device)[:, None] * (P * T) + rank * T
                       + torch.arange(T, device=x_TD.device)[None, :]).reshape(-1)
            keep_N = keep_G[local_G]
        kept_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device).scatter_add_(0, expert_N, keep_N.long())
        # Row counts first: recv_PEl[s, e] = rows rank s sends to this rank's local expert e.
        recv_PEl = torch.empty(P, El, dtype=torch.int64, device=x_TD.device)
        torch.distributed.all_to_all_single(recv_PEl, kept_E.view(P, El).contiguous(), group=group)
        # all_to_all takes its split sizes on the host: the one synchronisation of the layer.
        splits = torch.cat([kept_E.view(P, El).sum(1), recv_PEl.sum(1)]).tolist()
        send_splits, recv_splits = splits[:P], splits[P:]
        # Kept slots sorted by expert: grouped by destination rank, then by local expert, priority order inside.
        send_S = torch.argsort(torch.where(keep_N, expert_N, E), stable=True)[:sum(send_splits)]
        x_recv = all_to_all(x_TD[send_S % T], recv_splits, send_splits, group)
        # Received rows come grouped by source rank; regroup them by local expert for the grouped GEMM.
        expert_of_row = torch.repeat_interleave(torch.arange(El, device=x_TD.device).repeat(P), recv_PEl.reshape(-1),
                                                output_size=x_recv.shape[0])
        by_expert = torch.argsort(expert_of_row, stable=True)
        y_rows = self.experts(x_recv[by_expert], torch.cumsum(recv_PEl.sum(0), 0).to(torch.int32))
        back = torch.empty_like(by_expert).scatter_(0, by_expert, torch.arange(len(by_expert), device=x_TD.device))
        y_send = all_to_all(y_rows[back], send_splits, recv_splits, group)
        weight_S = routing.weights_TK.t().reshape(-1).index_select(0, send_S).to(y_send.dtype)
        y_TD = y_send.new_zeros(T, D).index_add(0, send_S % T, y_send * weight_S[:, None])
        dropped = N - keep_N.sum()
        return y_TD.to(x_TD.dtype), tokens_per_expert_E, dropped

    def _forward_expert_choice(self, x_TD: torch.Tensor, routing: RouterOutput):
        """Each expert's chosen tokens are already its group of rows (C each): gather, grouped GEMM, scatter-add."""
        T, D = x_TD.shape
        E, C = routing.token_ids_EC.shape
        token_R = routing.token_ids_EC.reshape(-1)
        offs_E = torch.arange(1, E + 1, device=x_TD.device, dtype=torch.int32) * C
        y_RD = self.experts(x_TD[token_R], offs_E)
        weighted_RD = (y_RD * routing.weights_EC.reshape(-1, 1).to(y_RD.dtype)).to(x_TD.dtype)
        y_TD = torch.zeros_like(x_TD).index_add(0, token_R, weighted_RD)
        tokens_per_expert_E = torch.full((E,), C, dtype=torch.int64, device=x_TD.device)
        # Slots a token-choice top-k would have used, left unrouted: tokens no expert chose, times top_k.
        chosen_T = torch.zeros(T, dtype=torch.bool, device=x_TD.device).index_fill(0, token_R, True)
        dropped = (~chosen_T).sum() * self.top_k
        return y_TD, tokens_per_expert_E, dropped

    def _forward_loop(self, x_TD: torch.Tensor, routing: RouterOutput, capacity: Optional[int]):
        """Reference implementation: one expert at a time, boolean masks, no permutation tricks."""
        T, D = x_TD.shape
        expert_KT = routing.expert_ids_TK.t()
        weight_KT = routing.weights_TK.t()
        y_TD = torch.zeros_like(x_TD)
        tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device=x_TD.device)
        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        for expert in range(self.num_experts):
            slots = (expert_KT == expert).reshape(-1).nonzero().squeeze(-1)  # k-major priority order
            if self.cfg.drop_policy == "probability":
                slots = slots[torch.argsort(-weight_KT.reshape(-1)[slots], stable=True)]
            tokens_per_expert[expert] = slots.numel()
            if capacity is not None and slots.numel() > capacity:
                dropped += slots.numel() - capacity
                slots = slots[:capacity]
            token, choice = slots % T, slots // T
            out = self.experts.expert_forward(expert, x_TD[token])
            weight = routing.weights_TK[token, choice].unsqueeze(-1)
            y_TD = y_TD.index_add(0, token, (out * weight.to(out.dtype)).to(x_TD.dtype))
        return y_TD, tokens_per_expert, dropped
