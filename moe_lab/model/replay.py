"""Routing replay: record which experts every token took in every MoE layer, and make another forward take them.

Reinforcement learning samples with one engine and trains with another; the two route about 10% of the decisions
differently (Megatron-LM #4168), and GRPO on MoE models collapses unless the trainer routes as the sampler did.
Ablations ask the same thing: model B under model A's routing. The contract the RL trainers converged on
(Megatron-LM #2693, NeMo Automodel #2797, verl #6325), which every router here keeps:

    - only the discrete selection is replayed: the combine weights are the live router's, taken from its full
      scores at the replayed experts (never from scores already zeroed outside the live top-k, which silently
      stops the gate's gradient whenever a replayed expert is not in the live top-k);
    - the aux losses and load statistics see the replayed selection (capacity and drops follow from it);
    - a selection is keyed by (micro-batch, layer), so gradient accumulation and activation recompute replay the
      same choice;
    - a selection whose tokens, layer, experts or k do not fit the model is an error (`ReplayMismatch`), never a
      silent fall back to live routing.

The model side is a `RoutingTape` (`MoETransformer.record_routing` / `replay_routing`); the file side, the Parquet
trace of `moe-lab analyze --trace`, is read into one by `moe_lab/tools/routing_trace.py`.

Shape legend: T tokens of the layer's input, K experts per token, E routed experts, N slots (routers.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional, Protocol

import torch


class Slots(Protocol):
    """What a selection is taken from: a router's `Routing` (routers.py, which imports this module)."""

    expert_N: torch.Tensor
    num_tokens: int
    slots_by: str

    @property
    def token_N(self) -> torch.Tensor: ...


class ReplayMismatch(ValueError):
    """A recorded selection that does not fit the model or the batch it is replayed on."""


@dataclass(frozen=True)
class Selection:
    """One layer's routing decisions for one micro-batch, without weights: slot n sends token `token_N[n]` to expert
    `expert_N[n]`, in the router's slot order (token choice: K slots per token, k-major; expert choice: expert-major).
    `token_ids_T` are the token ids it was recorded on, when known: replay checks them."""

    expert_N: torch.Tensor  # int64
    token_N: torch.Tensor  # int64
    num_tokens: int  # T
    slots_by: str = "token"  # "token" or "expert", as Routing.slots_by
    token_ids_T: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, routing: Slots, token_ids_T: Optional[torch.Tensor] = None) -> "Selection":
        """The selection of a live routing (detached)."""
        ids = None if token_ids_T is None else token_ids_T.detach()
        return cls(routing.expert_N.detach(), routing.token_N.detach(), routing.num_tokens, routing.slots_by, ids)

    @classmethod
    def from_token_choice(cls, expert_ids_TK: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> "Selection":
        """Each token's K experts (T, K), first choice first."""
        T, K = expert_ids_TK.shape
        token_N = torch.arange(T, device=expert_ids_TK.device).repeat(K)
        return cls(expert_ids_TK.t().reshape(-1).long(), token_N, T, "token", token_ids_T)

    @property
    def expert_ids_TK(self) -> torch.Tensor:
        """(T, K) experts of each token (a token-choice selection)."""
        return self.expert_N.view(-1, self.num_tokens).t()

    def to(self, device: torch.device) -> "Selection":
        ids = None if self.token_ids_T is None else self.token_ids_T.to(device)
        return Selection(self.expert_N.to(device), self.token_N.to(device), self.num_tokens, self.slots_by, ids)

    def check(
        self,
        layer: int,
        num_tokens: int,
        num_experts: int,
        top_k: int,
        token_choice: bool,
        token_ids_T: Optional[torch.Tensor],
        skips: bool = False,
    ) -> None:
        """ReplayMismatch unless this selection fits a layer of E experts choosing K per token (`skips`: up to K,
        the slots it leaves going to no expert, id E), routing these tokens (the check synchronises with the device:
        replay is for studies and RL, not for speed)."""
        where = f"routing replay, layer {layer}"
        if self.num_tokens != num_tokens:
            raise ReplayMismatch(f"{where}: the recording has {self.num_tokens} tokens, the batch {num_tokens}")
        if token_ids_T is not None and self.token_ids_T is not None:
            if not torch.equal(self.token_ids_T.to(token_ids_T.device), token_ids_T):
                raise ReplayMismatch(f"{where}: the recording was made on other tokens than this batch's")
        highest = num_experts if skips else num_experts - 1
        if self.expert_N.numel() and (int(self.expert_N.min()) < 0 or int(self.expert_N.max()) > highest):
            raise ReplayMismatch(
                f"{where}: the recording names experts up to {int(self.expert_N.max())}; the layer has {num_experts}"
            )
        wanted = "token" if token_choice else "expert"
        if self.slots_by != wanted:
            raise ReplayMismatch(
                f"{where}: the recording's experts were chosen by {self.slots_by}, this router chooses by {wanted}"
            )
        if token_choice:
            expected = torch.arange(num_tokens, device=self.token_N.device).repeat(max(top_k, 1))
            if self.token_N.numel() != num_tokens * top_k:
                raise ReplayMismatch(
                    f"{where}: the recording gives {self.token_N.numel() / max(num_tokens, 1):g} experts per "
                    f"token; the router takes k={top_k}"
                )
            if not torch.equal(self.token_N, expected):
                raise ReplayMismatch(f"{where}: the recording does not list k experts for every token in order")
        else:
            per_expert = self.expert_N.numel() // num_experts
            expected = torch.arange(num_experts, device=self.expert_N.device).repeat_interleave(per_expert)
            if self.expert_N.numel() != num_experts * per_expert or not torch.equal(self.expert_N, expected):
                raise ReplayMismatch(f"{where}: the recording does not list the same number of tokens per expert")
            if self.token_N.numel() and (int(self.token_N.min()) < 0 or int(self.token_N.max()) >= num_tokens):
                raise ReplayMismatch(f"{where}: the recording names tokens beyond the batch's {num_tokens}")


@dataclass
class RoutingTape:
    """Selections by (micro-batch, layer). Recording fills it, replay reads it; `micro_batch` is the key of the
    forward passes to come (any hashable: the trainer uses the micro-batch's place in the data stream), so that a
    recomputed forward or another accumulation step finds its own micro-batch's choice.

    The in-memory twin of a Parquet trace, for a process that records and replays (sample with one engine, train
    with another)."""

    selections: dict[tuple[Hashable, int], Selection] = field(default_factory=dict)
    micro_batch: Hashable = 0

    def record(self, layer: int, routing: Slots, token_ids_T: Optional[torch.Tensor] = None) -> None:
        self.selections[(self.micro_batch, layer)] = Selection.of(routing, token_ids_T)

    def selection(self, layer: int) -> Selection:
        found = self.selections.get((self.micro_batch, layer))
        if found is None:
            recorded = sorted({l for mb, l in self.selections if mb == self.micro_batch})
            raise ReplayMismatch(
                f"routing replay: nothing recorded for layer {layer} of micro-batch {self.micro_batch!r} "
                f"(recorded layers: {recorded or 'none'})"
            )
        return found

    def layers(self, micro_batch: Hashable) -> list[int]:
        return sorted(l for mb, l in self.selections if mb == micro_batch)


def overridden_slots(live_TK: torch.Tensor, replayed_TK: torch.Tensor) -> torch.Tensor:
    """How many replayed (token, expert) decisions the live router would not have made (int64 scalar)."""
    return (replayed_TK[:, :, None] != live_TK[:, None, :]).all(-1).sum()


def overridden_pairs(
    live_token_N: torch.Tensor, live_expert_N: torch.Tensor, token_N: torch.Tensor, expert_N: torch.Tensor, E: int
) -> torch.Tensor:
    """The same for slot lists of any shape (expert choice): replayed pairs absent from the live ones."""
    return (~torch.isin(token_N * E + expert_N, live_token_N * E + live_expert_N)).sum()
