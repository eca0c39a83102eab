"""Token dispatch: which routing slots each expert processes, and moving their rows there and back.

Shape legend:
    T  tokens of this rank's micro-batch      D  d_model
    E  routed experts (all of them)           El experts held by this rank (E / P)
    N  routing slots (see routers.py)         R  rows of an expert input: slots sorted by expert
    P  ranks of an expert-parallel group      Q  source rows the expert rows are gathered from (row r of the
    Rs rows this rank sends (its kept slots,     experts' input is source_QD[index_R[r]]): the tokens and a spare
       grouped by destination rank)              zero row locally, the received rows under all-to-all

Three steps, each independent of where the experts live:
    1. `plan_dispatch`: capacity and order. Slots are sorted by expert (a stable sort, so each expert's slots keep
       the router's priority order); an expert keeps at most `capacity` of them and the rest are dropped. Capacity is
       computed from this rank's micro-batch alone (GShard's "group"; Megatron-Core and DeepSpeed drop before
       dispatch the same way), so which slots are kept never depends on how the experts are spread over ranks.
    2. `dispatcher.dispatch`: the kept rows of this rank's experts, grouped by expert, with their routing weights.
    3. `dispatcher.combine`: expert outputs back to their tokens, summed over each token's slots.

`LocalDispatcher` is one gather and one scatter-add on this device (under torch.compile, for token choice, a second
gather and a sum: `expert_kernels.TokenRows`). `AllToAllDispatcher` (expert parallelism) sends
each kept row to the rank holding its expert and brings the output back, with `all_to_all` over the expert-parallel
group. Both present the experts with the same rows in the same order, so a layer computes the same function at any
expert-parallel size. Neither has a Python loop over tokens or experts; the local path has no host-device
synchronisation at all, the all-to-all path one (its split sizes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moe_lab.model.expert_kernels import TokenRows, sum_token_rows
from moe_lab.model.routers import Routing


@dataclass(frozen=True)
class DispatchPlan:
    """Where every routing slot goes; built once per layer call by `plan_dispatch`."""

    row_slot_R: torch.Tensor  # int64 (N,), the slot of each row: grouped by expert, kept rows first, dropped after
    kept_E: Optional[torch.Tensor]  # int64 (E,), kept slots per expert (None: dropless, read from offs_E)
    offs_E: torch.Tensor  # int32 (E,), cumulative kept rows per expert (the grouped GEMM's group ends)
    # int64 (E,), routed slots per expert before capacity (None: dropless, every slot kept: read from offs_E).
    tokens_per_expert_E: Optional[torch.Tensor]
    row_kept_R: Optional[torch.Tensor]  # bool (N,), rows under capacity; None when nothing can be dropped
    dropped_slots: Optional[torch.Tensor]  # int64 scalar (None: dropless, nothing dropped)

    def kept_counts_E(self) -> torch.Tensor:
        """int64 (E,), kept slots per expert."""
        return counts_from_offsets(self.offs_E) if self.kept_E is None else self.kept_E


def counts_from_offsets(offs_E: torch.Tensor) -> torch.Tensor:
    """int64 (E,) group sizes from the grouped GEMM's group ends."""
    ends_E = offs_E.long()
    return torch.diff(ends_E, prepend=ends_E.new_zeros(1))


def plan_dispatch(
    expert_N: torch.Tensor,
    num_experts: int,
    capacity: Optional[int],
    priority_N: Optional[torch.Tensor] = None,
    skips: bool = False,
) -> DispatchPlan:
    """Sort slots by expert and apply the capacity limit (None = dropless).

    Within an expert, slots keep their order (the router's: k-major for token choice, GShard's "position" policy),
    or, given `priority_N`, the highest priority first (the "probability" policy); over capacity, the last are
    dropped. With `skips`, slots of expert id E go to no expert: they sort last and are set aside like dropped
    slots, uncounted (a token that takes fewer experts costs fewer rows, without a host synchronisation).
    """
    device = expert_N.device
    num_slots = expert_N.numel()
    if not skips and priority_N is None and (capacity is None or capacity >= num_slots):
        # Dropless: one sort, and each expert's group end found in the sorted ids: 3 kernels, where the sort with a
        # histogram, its cumulative sum and a cast made 6. The counts are read from the ends when asked for.
        sorted_N, order_N = torch.sort(expert_N, stable=True)
        experts_E = torch.arange(num_experts, device=device, dtype=sorted_N.dtype)
        offs_E = torch.searchsorted(sorted_N, experts_E, right=True, out_int32=True)
        return DispatchPlan(order_N, None, offs_E, None, None, None)
    # Histogram by scatter-add: torch.bincount would synchronise with the host to learn max(input). With skips, the
    # last bin counts the slots of no expert.
    counts_B = torch.zeros(num_experts + int(skips), dtype=torch.int64, device=device)
    counts_B.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    tokens_per_expert_E = counts_B[:num_experts] if skips else counts_B
    if priority_N is None:
        order_N = torch.argsort(expert_N, stable=True)
    else:
        by_priority_N = torch.argsort(-priority_N, stable=True)
        order_N = by_priority_N[torch.argsort(expert_N[by_priority_N], stable=True)]

    if not skips and (capacity is None or capacity >= num_slots):  # dropless, ordered by priority
        return DispatchPlan(
            order_N,
            tokens_per_expert_E,
            torch.cumsum(tokens_per_expert_E, 0).to(torch.int32),
            tokens_per_expert_E,
            None,
            None,
        )
    arange_N = torch.arange(num_slots, device=device)
    sorted_expert_N = expert_N[order_N]
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    position_N = arange_N - starts_B[sorted_expert_N]  # place in the expert's queue
    keep_N = sorted_expert_N < num_experts  # not a slot of no expert
    if capacity is not None:
        keep_N = keep_N & (position_N < capacity)
    kept_E = tokens_per_expert_E if capacity is None else tokens_per_expert_E.clamp(max=capacity)
    num_kept = kept_E.sum()
    kept_starts_B = torch.cat([torch.cumsum(kept_E, 0) - kept_E, num_kept.view(1)])
    # Kept slots go to their expert's block of rows; dropped slots (and slots of no expert) are parked after all kept
    # rows, where the grouped GEMM (which stops at offs[-1]) never reads them.
    parked_rank_N = torch.cumsum(~keep_N, 0) - 1
    dest_N = torch.where(keep_N, kept_starts_B[sorted_expert_N] + position_N, num_kept + parked_rank_N)
    row_slot_R = torch.empty_like(order_N).scatter_(0, dest_N, order_N)
    return DispatchPlan(
        row_slot_R,
        kept_E,
        torch.cumsum(kept_E, 0).to(torch.int32),
        tokens_per_expert_E,
        arange_N < num_kept,
        tokens_per_expert_E.sum() - num_kept,
    )


@dataclass(frozen=True)
class LocalCombine:
    """What `LocalDispatcher.combine` needs to bring the expert outputs home."""

    token_R: torch.Tensor  # int64 (R,), each row's token (T, the spare row, for a dropped row)
    rows_out: int  # T + 1 with drops (the spare row is cut off after the sum), else T
    num_tokens: int  # T


@dataclass(frozen=True)
class AllToAllCombine:
    """What `AllToAllDispatcher.combine` needs: the row counts to send back and each sent row's token."""

    token_Rs: torch.Tensor  # int64 (Rs,), the token of each row this rank sent
    num_tokens: int  # T
    send_splits: list[int]  # P row counts this rank sent to each rank (and receives back)
    recv_splits: list[int]  # P row counts it received from each rank (and sends back)
    by_expert_R: Optional[torch.Tensor] = None  # int64, received rows regrouped by local expert (one grouped GEMM)


@dataclass(frozen=True)
class ExpertRows:
    """The rows this rank's experts process: inputs grouped by local expert, their routing weights (applied inside
    the experts), the group ends, and what `combine` needs to send the outputs home. With `parts`, the experts run
    once per part (rows [start, end), its own group ends): the all-to-all dispatcher's deterministic mode.

    The rows are given as a source and an index (row r is source_QD[index_R[r]]) so that the experts gather them
    inside their first GEMM and autograd keeps the source (Q rows) rather than the R = top_k x T gathered ones."""

    source_QD: torch.Tensor
    weight_R: torch.Tensor  # float32 (R,), the routing weight of each row
    offs_El: Optional[torch.Tensor]  # int32 (El,), cumulative rows per local expert
    combine: Union[LocalCombine, AllToAllCombine]
    parts: Optional[list[tuple[int, int, torch.Tensor]]] = None
    index_R: Optional[torch.Tensor] = None  # int64 (R,); None: the source is the rows, in order
    token_rows: Optional[TokenRows] = None  # index_R's inverse for the source's first T rows (the tokens)

    @property
    def x_RD(self) -> torch.Tensor:
        return self.source_QD if self.index_R is None else self.source_QD.index_select(0, self.index_R)


class _ScatterAddRows(torch.autograd.Function):
    """out (rows_out, D) = zeros, out[index_R[r]] += y_RD[r]: `index_add`, whose autograd keeps the whole source y_RD
    only to know its shape; this keeps the index alone (backward is a gather of the output gradient). With row_N
    (token_rows' tensors, for token choice under torch.compile), the same sums by gather (`sum_token_rows`), as
    (T, D): the spare rows past the tokens are left out, and get a zero gradient."""

    @staticmethod
    def forward(
        ctx,
        y_RD: torch.Tensor,
        index_R: torch.Tensor,
        rows_out: int,
        row_N: Optional[torch.Tensor] = None,
        kept_N: Optional[torch.Tensor] = None,
        num_tokens: int = 0,
    ) -> torch.Tensor:
        ctx.save_for_backward(index_R)
        ctx.rows_out = rows_out
        if row_N is not None:
            return sum_token_rows(y_RD, TokenRows(row_N, kept_N, num_tokens))
        zeros = y_RD.new_zeros(rows_out, y_RD.shape[1])
        if torch.compiler.is_compiling():
            # Out of place under torch.compile: an in-place operation on the returned tensor makes torch 2.11's
            # dynamo send the backward's gradient to the wrong output, silently (pytorch#180642, fixed in 2.12).
            return zeros.index_add(0, index_R, y_RD)
        return zeros.index_add_(0, index_R, y_RD)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (index_R,) = ctx.saved_tensors
        spare = ctx.rows_out - grad_out.shape[0]  # rows the gather left out
        if spare:
            grad_out = torch.cat([grad_out, grad_out.new_zeros(spare, grad_out.shape[1])])
        return grad_out.index_select(0, index_R), None, None, None, None, None


def scatter_add_rows(
    y_RD: torch.Tensor, index_R: torch.Tensor, rows_out: int, token_rows: Optional[TokenRows] = None
) -> torch.Tensor:
    """Sum rows of y_RD into rows_out output rows by index (each token's slots into the token); given token_rows,
    by gather, into the T token rows alone."""
    if token_rows is None:
        return _ScatterAddRows.apply(y_RD, index_R, rows_out)
    by = token_rows
    return _ScatterAddRows.apply(y_RD, index_R, rows_out, by.row_N, by.kept_N, by.num_tokens)


def token_rows_of(routing: Routing, plan: DispatchPlan) -> Optional[TokenRows]:
    """Each token's rows (plan.row_slot_R inverted), for token choice under torch.compile; else None (an eager
    index-add is the faster sum, and expert choice gives a token any number of slots)."""
    num_slots, T = plan.row_slot_R.shape[0], routing.num_tokens
    if not torch.compiler.is_compiling() or routing.slots_by != "token" or T == 0 or num_slots % T:
        return None
    rows_R = torch.arange(num_slots, device=plan.row_slot_R.device)
    row_N = torch.empty_like(plan.row_slot_R).scatter_(0, plan.row_slot_R, rows_R)
    kept_N = plan.row_kept_R.index_select(0, row_N) if plan.row_kept_R is not None else None
    return TokenRows(row_N, kept_N, T)


class LocalDispatcher:
    """Every expert on this device: one gather of the token rows in expert order, one scatter-add back."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, plan: DispatchPlan) -> ExpertRows:
        T, D = x_TD.shape
        token_R = routing.tokens_of(plan.row_slot_R)
        weight_R = routing.weight_N.index_select(0, plan.row_slot_R)
        x_src = x_TD
        if plan.row_kept_R is not None:
            # Dropped rows read a zero row and write to a spare row T that is discarded, with weight 0: the grouped
            # GEMM leaves rows past its last group undefined, and this keeps them away from outputs and gradients.
            token_R = torch.where(plan.row_kept_R, token_R, T)
            weight_R = torch.where(plan.row_kept_R, weight_R, 0.0)
            x_src = torch.cat([x_TD, x_TD.new_zeros(1, D)])
        # The experts gather rows x_src[token_R] inside their first GEMM (backward: index_add, or by token_rows).
        home = LocalCombine(token_R, x_src.shape[0], T)
        return ExpertRows(x_src, weight_R, plan.offs_E, home, index_R=token_R, token_rows=token_rows_of(routing, plan))

    def combine(self, y_RD: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
        home = rows.combine
        assert isinstance(home, LocalCombine)
        y_TD = scatter_add_rows(y_RD, home.token_R, home.rows_out, rows.token_rows)  # sum each token's slots
        # Cut the spare row only where there is one: a slice's backward is a kernel (zeros, then a copy).
        return y_TD if y_TD.shape[0] == home.num_tokens else y_TD[: home.num_tokens]


class AllToAllDispatcher:
    """Expert parallelism: this rank holds experts [rank * El, (rank + 1) * El) of an expert-parallel group of P
    ranks. Kept rows travel to their expert's rank with all_to_all (row counts exchanged first), run through the
    local experts as one grouped GEMM, and come back the same way."""

    def __init__(self, group: Optional[dist.ProcessGroup], rank: int, size: int, num_experts: int):
        self.group, self.rank, self.size = group, rank, size
        self.local_experts = num_experts // size

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, plan: DispatchPlan) -> ExpertRows:
        P, El = self.size, self.local_experts
        # Kept rows come first in the plan, grouped by expert, so they are already grouped by destination rank.
        send_PEl = plan.kept_counts_E().view(P, El).contiguous()
        recv_PEl = torch.empty_like(send_PEl)  # recv_PEl[s, e]: rows rank s sends to this rank's local expert e
        dist.all_to_all_single(recv_PEl, send_PEl, group=self.group)
        # all_to_all takes its split sizes on the host: the one synchronisation of the layer.
        splits = torch.cat([send_PEl.sum(1), recv_PEl.sum(1)]).tolist()
        send_splits, recv_splits = splits[:P], splits[P:]
        kept_rows = plan.row_slot_R[: sum(send_splits)]
        token_Rs = routing.tokens_of(kept_rows)
        x_recv = all_to_all(x_TD.index_select(0, token_Rs), recv_splits, send_splits, self.group)
        w_recv = all_to_all(routing.weight_N.index_select(0, kept_rows), recv_splits, send_splits, self.group)
        home = AllToAllCombine(token_Rs, x_TD.shape[0], send_splits, recv_splits)
        if torch.are_deterministic_algorithms_enabled():
            # Rows arrive grouped by source rank, then local expert. Running the experts once per source rank
            # computes every weight gradient as the sum of per-rank GEMMs, in the order data-parallel ranks sum
            # them: bit for bit what one rank holding every expert would compute (trainer.deterministic=true).
            ends = torch.cumsum(recv_PEl, 1).to(torch.int32)
            starts = [sum(recv_splits[:s]) for s in range(P)]
            parts = [(starts[s], starts[s] + recv_splits[s], ends[s]) for s in range(P) if recv_splits[s]]
            return ExpertRows(x_recv, w_recv, None, home, parts)
        # One grouped GEMM: regroup the received rows by local expert.
        expert_of_row = torch.repeat_interleave(
            torch.arange(El, device=x_TD.device).repeat(P), recv_PEl.reshape(-1), output_size=x_recv.shape[0]
        )
        by_expert = torch.argsort(expert_of_row, stable=True)
        offs_El = torch.cumsum(recv_PEl.sum(0), 0).to(torch.int32)
        home = dataclasses.replace(home, by_expert_R=by_expert)
        return ExpertRows(x_recv, w_recv.index_select(0, by_expert), offs_El, home, index_R=by_expert)

    def combine(self, y_RD: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
        home = rows.combine
        assert isinstance(home, AllToAllCombine)
        if home.by_expert_R is not None:  # back to the order the rows arrived in
            y_RD = torch.empty_like(y_RD).index_copy(0, home.by_expert_R, y_RD)
        y_send = all_to_all(y_RD, home.send_splits, home.recv_splits, self.group)
        return scatter_add_rows(y_send, home.token_Rs, home.num_tokens)


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x[:in_splits[0]] go to rank 0 of `group`, the next in_splits[1] to rank 1, ...; differentiable (the
    backward pass sends the gradients back the way they came: torch's functional all_to_all_single_autograd, as
    torchtitan's dispatcher; torch.distributed.nn's version is deprecated)."""
    return funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
