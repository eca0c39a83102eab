"""The MoE layer (Shazeer et al. 2017), in four steps:

    1. route     the router turns each token into routing slots: (token, expert, weight) decisions (routers.py);
                 under routing replay the experts are a recorded selection, weighted by the router (replay.py)
    2. experts   dispatch -> experts -> combine: capacity and the rows of each expert (dispatch.py), one grouped
                 GEMM per projection over all local experts (experts.py), outputs summed back into their tokens;
                 or, with `implementation="loop"`, the plain per-expert reference the tests hold the fast path to;
                 latent experts (`latent_dim`) take a down-projection of the tokens, and their combined output is
                 projected back up (LatentMoE): the rows they and the all-to-all carry are L wide instead of D
                 identity experts (LongCat-Flash) add their weight times the token, without a GEMM
    3. shared    the shared experts every token passes through (DeepSeekMoE), optionally gated
    4. outputs   the aux losses (with gradients) and the routing statistics (detached, still on device)

Shape legend:
    B  batch                 S  positions per sequence     T  tokens = B * S         D  d_model
    E  routed experts        K  experts per token          N  routing slots (see routers.py)
    L  the experts' width: latent_dim, or D
    R  rows of the experts' input: kept slots sorted by expert (see dispatch.py)

Capacity, drops, the router losses and every statistic are computed from this rank's micro-batch alone, so the layer
computes the same function whether its experts sit on this device (`LocalDispatcher`) or are spread over an
expert-parallel group (`AllToAllDispatcher`, set by `use_expert_parallel`). The fast path has no Python loop over
tokens or experts and, on one device, no host-device synchronisation, so it runs the same on CPU and GPU and under
`torch.compile`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moe_lab.model.checkpointing import uncounted
from moe_lab.model.config import MoEConfig
from moe_lab.model.dispatch import AllToAllDispatcher, ExpertRows, LocalDispatcher, counts_from_offsets, plan_dispatch
from moe_lab.model.experts import FeedForward, GroupedExperts
from moe_lab.model.losses import (
    global_load_balance_loss,
    importance_loss,
    load_balance_loss,
    load_loss,
    router_z_loss,
    sequence_load_balance_loss,
    slot_load_balance_loss,
)
from moe_lab.model.replay import RoutingTape, Selection
from moe_lab.model.routers import RouterInputs, Routing, build_router
from moe_lab.model.seeding import seeded_part


@dataclass
class MoELayerOutput:
    """What one call gives beside its output: the aux losses training weights (with gradients), and the routing and
    dispatch counts every statistic is read from. The statistics are properties, computed when first read (detached,
    on the device: no sync): a training step that does not log reads none of them and pays for none (on a GPU, a
    kernel launch or more each, per layer)."""

    routing: Routing
    routed: RoutedOutput  # what dispatch and capacity did: counts, drops, the plan's rows
    batch_size: int
    # The unweighted aux losses training weights (weight > 0), and the router's own, by name, with gradients.
    training_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @functools.cached_property
    def losses(self) -> dict[str, torch.Tensor]:
        """Every aux loss the router supports, unweighted: the weighted ones, and the Switch loss and z-loss, which
        are logged whatever their weight (computed here when unweighted)."""
        return {**logged_losses(self.routing, self.routed.counts_E()), **self.training_losses}

    @functools.cached_property
    def tokens_per_expert_E(self) -> torch.Tensor:
        """float32, routed token slots per expert, before drops."""
        return self.routed.counts_E().detach().float()

    @property
    def row_slot_R(self) -> Optional[torch.Tensor]:
        """The dispatch plan's rows (grouped path), for `slot_kept_N`."""
        return self.routed.row_slot_R

    @property
    def row_kept_R(self) -> Optional[torch.Tensor]:
        return self.routed.row_kept_R

    @functools.cached_property
    def dropped_slots(self) -> torch.Tensor:
        """float32 scalar, slots that overflowed capacity or went unrouted (expert choice)."""
        dropped = self.routed.dropped_slots
        dropped = self.routing.expert_N.new_zeros(()) if dropped is None else dropped
        if self.routing.unrouted_slots is not None:
            dropped = dropped + self.routing.unrouted_slots
        return dropped.detach().float()

    @functools.cached_property
    def confidence(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return routing_confidence(self.routing)

    @property
    def router_entropy(self) -> torch.Tensor:
        """float32 scalar, mean per-token entropy of the router's probabilities (nats)."""
        return self.confidence[0]

    @property
    def topk_mass(self) -> Optional[torch.Tensor]:
        """float32 scalar, mean router probability mass of a token's experts (None: no distribution)."""
        return self.confidence[1]

    # Every routing decision (slot n: expert_N[n] took token_N[n] with weight weight_N[n]), before capacity.
    @property
    def expert_N(self) -> torch.Tensor:
        return self.routing.expert_N.detach()

    @property
    def token_N(self) -> torch.Tensor:
        return self.routing.token_N.detach()

    @property
    def weight_N(self) -> torch.Tensor:
        return self.routing.weight_N.detach()

    @functools.cached_property
    def overridden_slots(self) -> Optional[torch.Tensor]:
        """Routing replay: replayed slots this layer's own router would not have chosen (float32; None: live)."""
        overridden = self.routing.overridden_slots
        return None if overridden is None else overridden.detach().float()

    @functools.cached_property
    def experts_per_token_T(self) -> torch.Tensor:
        """How many experts each token went to, before capacity (float32 (T,)): K for a fixed top-k, anything from 0
        up for expert choice and the variable-k routers (dynamic compute)."""
        return self.routing.experts_per_token_T().detach()

    def slot_kept_N(self) -> Optional[torch.Tensor]:
        """Which routing slots were kept under capacity (None: nothing could be dropped)."""
        if self.row_kept_R is None:
            return None
        kept_N = torch.empty_like(self.row_kept_R)
        kept_N[self.row_slot_R] = self.row_kept_R
        return kept_N

    def top_expert_T(self, num_tokens: int) -> torch.Tensor:
        """Each token's expert of highest weight (-1: no expert took it), e.g. to colour text by routing."""
        weight_N, token_N, expert_N = self.weight_N.float(), self.token_N, self.expert_N
        weight_N = weight_N.masked_fill(expert_N >= self.routing.num_experts, float("-inf"))  # no one's slots
        best_T = torch.full((num_tokens,), float("-inf"), device=weight_N.device)
        best_T.scatter_reduce_(0, token_N, weight_N, reduce="amax")
        top = (weight_N == best_T[token_N]) & (weight_N > float("-inf"))
        expert_T = torch.full((num_tokens,), -1, dtype=torch.long, device=expert_N.device)
        expert_T[token_N[top]] = expert_N[top]
        return expert_T


LOGGED_LOSSES = ("load_balance", "z_loss")  # logged whatever their weight


def logged_losses(
    routing: Routing, routed_counts_E: Optional[torch.Tensor], names: tuple[str, ...] = LOGGED_LOSSES
) -> dict[str, torch.Tensor]:
    """The Switch load-balancing loss and the z-loss of a routing (those of `names`; none without a learned gate).
    Without the counts (dropless dispatch counts nothing), the Switch loss sums each slot's mean probability."""
    if routing.probs_TE is None:  # no learned gate (hash routing): nothing to balance by gradient
        return {}
    losses = {}
    if "z_loss" in names:
        if routing.z_loss is not None:
            losses["z_loss"] = routing.z_loss
        else:
            assert routing.logits_TE is not None, "a router with probabilities has logits"
            losses["z_loss"] = router_z_loss(routing.logits_TE)
    if "load_balance" in names:
        if routing.balance_loss is not None:
            losses["load_balance"] = routing.balance_loss
        elif routed_counts_E is None:
            losses["load_balance"] = slot_load_balance_loss(routing.probs_TE, routing.expert_N, routing.active_N)
        else:  # the counts sum to the slots unless some slots go to no expert
            num_slots = None if routing.skips else routing.expert_N.numel()
            losses["load_balance"] = load_balance_loss(routing.probs_TE, routed_counts_E, num_slots)
    return losses


@dataclass(frozen=True)
class RoutedOutput:
    """What the routed experts give back: the combined outputs and what capacity did."""

    y_TD: Optional[torch.Tensor]  # every token's weighted sum of its experts' outputs (None: not kept)
    # int64, routed slots per expert before capacity (None: dropless, where they are the sizes of the groups that
    # end at offs_E, read when asked for)
    tokens_per_expert_E: Optional[torch.Tensor]
    dropped_slots: Optional[torch.Tensor]  # int64 scalar, slots over capacity (None: dropless)
    row_slot_R: Optional[torch.Tensor] = None  # the dispatch plan's rows (grouped path), see MoELayerOutput
    row_kept_R: Optional[torch.Tensor] = None
    offs_E: Optional[torch.Tensor] = None  # int32, the grouped GEMM's group ends (grouped path)

    def counts_E(self) -> torch.Tensor:
        if self.tokens_per_expert_E is not None:
            return self.tokens_per_expert_E
        assert self.offs_E is not None, "a routed output without counts has its groups' ends"
        return counts_from_offsets(self.offs_E)


@torch.no_grad()
def routing_confidence(routing: Routing) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(mean per-token entropy of the router's distribution in nats, mean probability mass of a token's chosen
    experts); a router without a distribution over experts (a fixed table) has entropy 0 and no mass."""
    device = routing.expert_N.device
    if routing.probs_TE is None:
        return torch.zeros((), device=device), None
    probs_TE = routing.probs_TE.detach()
    entropy = torch.special.entr(probs_TE).sum(-1).mean()
    chosen_N = probs_TE[routing.token_N, routing.expert_N.clamp(max=routing.num_experts - 1)]
    if routing.skips:  # slots of no expert hold no mass
        chosen_N = chosen_N * (routing.expert_N < routing.num_experts)
    mass = torch.zeros(routing.num_tokens, device=device).index_add_(0, routing.token_N, chosen_N).mean()
    return entropy, mass


def expert_capacity(
    capacity_factor: Optional[float], num_tokens: int, top_k: int, num_experts: int, min_capacity: int = 0
) -> Optional[int]:
    """Token slots one expert may take: ceil(cf * T * K / E) (Switch Transformer), at least min_capacity; None =
    dropless."""
    if capacity_factor is None:
        return None
    return max(math.ceil(capacity_factor * num_tokens * top_k / num_experts), min_capacity)


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN (Shazeer et al. 2017) with any registered router and optional shared experts."""

    def __init__(
        self,
        d_model: int,
        cfg: MoEConfig,
        init_std: float = 0.02,
        out_std: float = 0.02,
        vocab_size: Optional[int] = None,
        layer: int = 0,
    ):
        super().__init__()
        self.cfg = cfg
        self.layer = layer  # the block index: the key of this layer's routing in a replay tape
        self.num_experts = cfg.num_experts
        # Router, experts and shared experts each from a random stream of their own (seeding.py): two layers that
        # differ in the router alone start with the same experts.
        with seeded_part("router"):
            self.router = build_router(d_model, cfg.num_experts, cfg.router, init_std=init_std, vocab_size=vocab_size)
        self.top_k = self.router.top_k
        with seeded_part("latent"):  # latent experts: one projection into their latent and one out of it
            self.latent_down: Optional[nn.Linear] = None
            self.latent_up: Optional[nn.Linear] = None
            if cfg.latent_dim is not None:
                self.latent_down = nn.Linear(d_model, cfg.latent_dim, bias=False)
                self.latent_up = nn.Linear(cfg.latent_dim, d_model, bias=False)
                nn.init.normal_(self.latent_down.weight, std=init_std)
                nn.init.normal_(self.latent_up.weight, std=out_std)
        with seeded_part("experts"):
            self.experts = GroupedExperts(
                cfg.num_experts,
                cfg.latent_dim or d_model,
                cfg.expert_hidden,
                cfg.activation,
                init_std=init_std,
                out_std=out_std,
                bias=cfg.expert_bias,
            )
        with seeded_part("shared"):
            self.shared = None
            if cfg.num_shared > 0:
                self.shared = FeedForward(d_model, cfg.shared_width, cfg.activation, init_std, out_std)
            with_gate = self.shared is not None and cfg.shared_gate
            self.shared_gate = nn.Linear(d_model, 1, bias=False) if with_gate else None
            if self.shared_gate is not None:
                nn.init.normal_(self.shared_gate.weight, std=init_std)
        self.dispatcher: LocalDispatcher | AllToAllDispatcher = LocalDispatcher()
        # Routing replay (replay.py): set by MoETransformer.record_routing / replay_routing, never saved.
        self.tape: Optional[RoutingTape] = None
        self.tape_mode: Optional[str] = None  # "record" or "replay"

    def use_expert_parallel(self, group: Optional[dist.ProcessGroup], rank: int, size: int) -> None:
        """Keep this rank's E / size experts; token rows reach them by all-to-all over `group`."""
        if size > 1 and not self.experts.is_sharded:
            per_rank = self.num_experts // size
            self.experts.keep_experts(rank * per_rank, per_rank)
            self.dispatcher = AllToAllDispatcher(group, rank, size, self.num_experts)

    @property
    def capacity_factor(self) -> Optional[float]:
        return self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots one expert may take from this micro-batch (None = dropless)."""
        if not self.router.uses_capacity:
            return None
        return expert_capacity(self.capacity_factor, num_tokens, self.top_k, self.num_experts, self.cfg.min_capacity)

    def forward(
        self, x_BSD: torch.Tensor, token_ids_BS: Optional[torch.Tensor] = None, domain_B: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, MoELayerOutput]:
        """Steps 1-4 of the module docstring; `token_ids_BS` for routers that route by id, `domain_B` for the
        domain oracle."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.route(self.router_inputs(x_TD, token_ids_BS, domain_B, batch_size=B))
        z_TL = x_TD if self.latent_down is None else self.latent_down(x_TD)  # the experts' input (L = D without)
        if self.cfg.implementation == "loop":
            routed = self.routed_experts_loop(z_TL, routing)
        else:
            routed = self.routed_experts(z_TL, routing)
        assert routed.y_TD is not None
        y_TD = routed.y_TD if self.latent_up is None else self.latent_up(routed.y_TD)
        if routing.identity_weight_T is not None:  # identity experts, E(x) = x: no GEMM, no dispatch
            y_TD = y_TD + routing.identity_weight_T[:, None].to(x_TD.dtype) * x_TD
        y_TD = y_TD if self.shared is None else y_TD + self.shared_experts(x_TD)
        return y_TD.view(B, S, D), self.layer_output(routing, routed, batch_size=B)

    def router_inputs(
        self,
        x_TD: torch.Tensor,
        token_ids_BS: Optional[torch.Tensor],
        domain_B: Optional[torch.Tensor],
        batch_size: int,
    ) -> RouterInputs:
        domain_T = None
        if self.router.needs_domain:  # the oracle routes by each sequence's domain label
            if domain_B is None:
                raise ValueError(f"router={self.router.registered_name} needs the data's domain labels (domain_B)")
            domain_T = domain_B.repeat_interleave(x_TD.shape[0] // batch_size)
        token_ids_T = token_ids_BS.reshape(-1) if token_ids_BS is not None else None
        return RouterInputs(x_TD, token_ids_T, batch_size, self.capacity_factor, domain_T)

    def route(self, inputs: RouterInputs) -> Routing:
        """Step 1: the router's routing; under replay, of the recorded selection (checked against this layer and
        batch first); when recording, its selection goes on the tape. Activation checkpointing (checkpointing.py)
        pins the routing: its forward takes the live selection and routes as its replay ("pin"), the recompute
        replays it ("pinned"), so that both run the same operations."""
        if self.tape is None:
            return self.router(inputs)
        if self.tape_mode == "replay":
            return self.replayed(inputs, self.tape.selection(self.layer), checked=True)
        if self.tape_mode == "pinned":
            routing = self.replayed(inputs, self.tape.selection(self.layer), checked=False)
            routing.overridden_slots = None  # its own choice: nothing overridden
            return routing
        if self.tape_mode == "pin":
            self.tape.record(self.layer, self.live_selection(inputs), inputs.token_ids_T)
            routing = self.replayed(inputs, self.tape.selection(self.layer), checked=False)
            routing.overridden_slots = None
            return routing
        routing = self.router(inputs)
        self.tape.record(self.layer, routing, inputs.token_ids_T)
        return routing

    def live_selection(self, inputs: RouterInputs) -> Routing:
        """The router's own choice, outside the gradient, counting nothing, and leaving the random stream where it
        was: the replay that follows draws the same noise."""
        devices = [inputs.x_TD.device.index or 0] if inputs.x_TD.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), uncounted():
            return self.router(inputs)

    def replayed(self, inputs: RouterInputs, selection: Selection, checked: bool) -> Routing:
        selection = selection.to(inputs.x_TD.device)
        if checked:  # a recording from elsewhere (a file, another model): it must fit
            selection.check(
                self.layer,
                inputs.x_TD.shape[0],
                self.num_experts,
                self.top_k,
                self.router.token_choice,
                inputs.token_ids_T,
                skips=self.router.Config.variable_k,
            )
        return self.router(dataclasses.replace(inputs, replay=selection))

    def routed_experts(self, x_TD: torch.Tensor, routing: Routing) -> RoutedOutput:
        """Dispatch -> experts -> combine (torchtitan's RoutedExperts): the fast path."""
        priority_N = routing.weight_N if self.cfg.drop_policy == "probability" else None
        plan = plan_dispatch(
            routing.expert_N, self.num_experts, self.capacity(x_TD.shape[0]), priority_N, skips=routing.skips
        )
        rows = self.dispatcher.dispatch(x_TD, routing, plan)
        y_RD = self._experts(rows)
        y_TD = self.dispatcher.combine(y_RD, rows).to(x_TD.dtype)
        return RoutedOutput(
            y_TD, plan.tokens_per_expert_E, plan.dropped_slots, plan.row_slot_R, plan.row_kept_R, plan.offs_E
        )

    def shared_experts(self, x_TD: torch.Tensor) -> torch.Tensor:
        assert self.shared is not None
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return shared_TD

    def layer_output(self, routing: Routing, routed: RoutedOutput, batch_size: int) -> MoELayerOutput:
        """The aux losses training weights; the statistics are the output's to compute when read."""
        # The statistics need the counts, not the output: it is not kept past the step's use of it.
        counts = dataclasses.replace(routed, y_TD=None)
        return MoELayerOutput(routing, counts, batch_size, self._losses(routing, routed, batch_size))

    def _experts(self, rows: ExpertRows) -> torch.Tensor:
        if rows.parts is None:
            return self.experts(rows.source_QD, rows.offs_El, rows.weight_R, rows.index_R, rows.token_rows)
        if not rows.parts:  # no rank sent this rank a row: run the experts on no rows all the same, so that the
            # backward pass reaches this rank's all-to-alls as it reaches the others' (a detached zero tensor here
            # left the other ranks waiting in backward: a deadlock whenever one rank's experts got no token).
            offs_El = torch.zeros(self.experts.num_experts, dtype=torch.int32, device=rows.x_RD.device)
            return self.experts(rows.x_RD, offs_El, rows.weight_R)
        return self.experts.forward_in_parts(rows.source_QD, rows.parts, rows.weight_R)

    def _losses(self, routing: Routing, routed: RoutedOutput, batch_size: int) -> dict[str, torch.Tensor]:
        """The unweighted aux losses training weights (the configuration check rejects a weight on a loss the router
        cannot have), and the router's own; the logged but unweighted ones are MoELayerOutput.losses' to compute."""
        if routing.probs_TE is None:  # no learned gate (hash routing): nothing to balance by gradient
            return {}
        weights = self.cfg.aux_loss
        weighted = tuple(name for name in LOGGED_LOSSES if getattr(weights, name) > 0)
        losses = {**logged_losses(routing, routed.tokens_per_expert_E, weighted), **routing.own_losses}
        if weights.seq_load_balance > 0:
            losses["seq_load_balance"] = sequence_load_balance_loss(
                routing.probs_TE, routing.expert_N, routing.token_N, batch_size, routing.active_N
            )
        if weights.global_load_balance > 0:
            losses["global_load_balance"] = global_load_balance_loss(routing.probs_TE, routed.counts_E())
        if weights.importance > 0:
            losses["importance"] = importance_loss(routing.weight_N, routing.expert_N, self.num_experts)
        if weights.load > 0 and routing.load_estimate_E is not None:
            losses["load"] = load_loss(routing.load_estimate_E)
        return losses

    def routed_experts_loop(self, x_TD: torch.Tensor, routing: Routing) -> RoutedOutput:
        """Reference implementation: one expert at a time, boolean masks, its own counting; no permutation tricks."""
        capacity = self.capacity(x_TD.shape[0])
        y_TD = torch.zeros_like(x_TD)
        tokens_per_expert_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_TD.device)
        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        for expert in range(self.num_experts):
            slots = (routing.expert_N == expert).nonzero().squeeze(-1)  # the router's priority order
            if self.cfg.drop_policy == "probability":
                slots = slots[torch.argsort(-routing.weight_N[slots], stable=True)]
            tokens_per_expert_E[expert] = slots.numel()
            if capacity is not None and slots.numel() > capacity:
                dropped += slots.numel() - capacity
                slots = slots[:capacity]
            token = routing.token_N[slots]
            out = self.experts.expert_forward(expert, x_TD[token])
            weight = routing.weight_N[slots].unsqueeze(-1)
            y_TD = y_TD.index_add(0, token, (out * weight.to(out.dtype)).to(x_TD.dtype))
        return RoutedOutput(y_TD, tokens_per_expert_E, dropped)
