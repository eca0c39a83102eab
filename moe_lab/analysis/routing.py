"""The routing analyses MoE papers publish, computed from counts over a pass of a model over data (NumPy only).

A pass adds each batch's routing decisions to a `RoutingCounts` (tables whose size does not grow with the data), and
the analyses read the tables:

    domain_shares        per layer and domain, each expert's share of the domain's tokens against the uniform k/E
                         (OLMoE 2024 section 5, Mixtral 2024 section 5)
    vocab_specialisation per token id, the share of its occurrences that went to its most frequent expert, for input
                         and for next tokens, and the random-routing baseline k/E (OLMoE)
    coactivation         P(expert j chosen | expert i chosen) within a layer over all pairs of a token's top-k
                         (OLMoE), and which first choice of layer l+1 follows which of layer l
    repeat_rates         how often consecutive tokens share their first-choice expert, or any of their top-k,
                         against chance: tokens paired at random (Mixtral section 5)
    drops_by_position    the dropped share of token slots by position in the sequence (OpenMoE: "drop towards the
                         end")
    saturation           the share of each token's top-1 and top-k sets at one checkpoint that match another's
                         (OLMoE's router saturation over training)
    experts_per_token    the distribution of a token's number of experts per layer, and its mean per token id and
                         per domain: which tokens take the most experts (dynamic compute: top-p, null experts, ReLU
                         routing, expert choice)

Every router is read the same way: a token's expert set of any size (none, one, many), listed first choice (highest
weight) first and padded with E (no expert) to the batch's largest set. A fixed top-k is the case of K experts each.

Shape legend: L MoE layers, B sequences, S positions, K experts per token, E experts, D domains, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class RoutingCounts:
    """What one pass over data accumulates. `add` takes each batch's chosen experts (L, B, S, K), first choice first,
    E where a token has fewer than K."""

    num_layers: int
    num_experts: int
    top_k: int  # the router's experts per token (for a variable number: its K slots), as the report states it
    vocab_size: int
    num_domains: int
    seq_len: int
    seed: int = 0
    # Each layer's own number of experts where they differ (a model pruned to a total budget); the tables are
    # num_experts wide, a narrower layer's extra columns take no token.
    layer_experts: Optional[tuple[int, ...]] = None
    domain_LED: np.ndarray = field(init=False)
    input_LVE: np.ndarray = field(init=False)  # occurrences of token v as input with expert e among its top-k
    next_LVE: np.ndarray = field(init=False)  # the same, keyed by the token that follows
    pairs_LEE: np.ndarray = field(init=False)  # tokens with both i and j in their top-k (diagonal: with i)
    follow_LEE: np.ndarray = field(init=False)  # first choice i at layer l, then j at layer l + 1
    repeat_L: np.ndarray = field(init=False)  # (L, 4): same top-1, any shared top-k; the same for random pairs
    pairs_seen: int = 0
    dropped_LS: np.ndarray = field(init=False)
    slots_LS: np.ndarray = field(init=False)
    tokens_D: np.ndarray = field(init=False)  # tokens per domain
    input_V: np.ndarray = field(init=False)  # occurrences of each token id as input
    next_V: np.ndarray = field(init=False)  # ... as the next token
    size_LN: np.ndarray = field(init=False)  # tokens with 0..E experts
    size_LV: np.ndarray = field(init=False)  # experts summed over each token id's occurrences
    size_LD: np.ndarray = field(init=False)  # experts summed over each domain's tokens

    def __post_init__(self) -> None:
        L, E, V, D, S = self.num_layers, self.num_experts, self.vocab_size, self.num_domains, self.seq_len
        self.domain_LED = np.zeros((L, E, D), dtype=np.int64)
        self.input_LVE = np.zeros((L, V, E), dtype=np.int32)
        self.next_LVE = np.zeros((L, V, E), dtype=np.int32)
        self.pairs_LEE = np.zeros((L, E, E), dtype=np.int64)
        self.follow_LEE = np.zeros((max(L - 1, 0), E, E), dtype=np.int64)
        self.repeat_L = np.zeros((L, 4), dtype=np.int64)
        self.dropped_LS = np.zeros((L, S), dtype=np.int64)
        self.slots_LS = np.zeros((L, S), dtype=np.int64)
        self.tokens_D = np.zeros(D, dtype=np.int64)
        self.input_V = np.zeros(V, dtype=np.int64)
        self.next_V = np.zeros(V, dtype=np.int64)
        self.size_LN = np.zeros((L, E + 1), dtype=np.int64)
        self.size_LV = np.zeros((L, V), dtype=np.int64)
        self.size_LD = np.zeros((L, D), dtype=np.int64)
        self._rng = np.random.default_rng(self.seed)

    def add(
        self,
        experts_LBSK: np.ndarray,
        tokens_BS: np.ndarray,
        next_BS: np.ndarray,
        domain_B: np.ndarray,
        dropped_LBSK: Optional[np.ndarray] = None,
    ) -> None:
        """One batch: every token's chosen experts per layer (first choice first), its id, the id that follows it,
        its sequence's domain, and which of its slots were dropped (None: none)."""
        L, B, S, K = experts_LBSK.shape
        E, T = self.num_experts, B * S
        onehot_LBSE = np.zeros((L, B, S, E + 1), dtype=bool)  # column E: no expert, dropped below
        np.put_along_axis(onehot_LBSE, experts_LBSK, True, axis=-1)
        onehot_LBSE = onehot_LBSE[..., :E]
        chosen_LTE = onehot_LBSE.reshape(L, T, E).astype(np.int64)
        size_LT = chosen_LTE.sum(-1)
        tokens_T, next_T = tokens_BS.reshape(-1), next_BS.reshape(-1)
        domain_T = np.repeat(domain_B, S)
        domain_TD = np.zeros((T, self.num_domains), dtype=np.int64)
        domain_TD[np.arange(T), domain_T] = 1
        self.domain_LED += np.einsum("lte,td->led", chosen_LTE, domain_TD)
        self.tokens_D += domain_TD.sum(0)
        np.add.at(self.input_V, tokens_T, 1)
        np.add.at(self.next_V, next_T, 1)
        self.size_LD += size_LT @ domain_TD
        for layer in range(L):
            np.add.at(self.input_LVE[layer], tokens_T, chosen_LTE[layer].astype(np.int32))
            np.add.at(self.next_LVE[layer], next_T, chosen_LTE[layer].astype(np.int32))
            np.add.at(self.size_LV[layer], tokens_T, size_LT[layer])
            self.size_LN[layer] += np.bincount(size_LT[layer], minlength=E + 1)
        self.pairs_LEE += np.einsum("lti,ltj->lij", chosen_LTE, chosen_LTE)
        first_LBS = experts_LBSK[..., 0]  # E: a token no expert took
        for layer in range(L - 1):
            a, b = first_LBS[layer].reshape(-1), first_LBS[layer + 1].reshape(-1)
            both = (a < E) & (b < E)
            np.add.at(self.follow_LEE[layer], (a[both], b[both]), 1)
        # Consecutive tokens of a sequence, and as many random pairs of tokens (chance); a token without an expert
        # shares no first choice.
        same_top1 = (first_LBS[:, :, 1:] == first_LBS[:, :, :-1]) & (first_LBS[:, :, 1:] < E)
        shared = (onehot_LBSE[:, :, 1:] & onehot_LBSE[:, :, :-1]).any(-1)
        other = self._rng.permutation(T)
        flat_first = first_LBS.reshape(L, -1)
        flat_onehot = onehot_LBSE.reshape(L, T, E)
        take = other[: B * (S - 1)]
        base = np.arange(B * (S - 1))
        self.repeat_L[:, 0] += same_top1.reshape(L, -1).sum(-1)
        self.repeat_L[:, 1] += shared.reshape(L, -1).sum(-1)
        self.repeat_L[:, 2] += ((flat_first[:, base] == flat_first[:, take]) & (flat_first[:, base] < E)).sum(-1)
        self.repeat_L[:, 3] += (flat_onehot[:, base] & flat_onehot[:, take]).any(-1).sum(-1)
        self.pairs_seen += B * (S - 1)
        self.slots_LS[:, :S] += (experts_LBSK < E).sum(axis=(1, 3))
        if dropped_LBSK is not None:
            self.dropped_LS[:, :S] += dropped_LBSK.sum(axis=(1, 3))


def domain_shares(counts: RoutingCounts) -> np.ndarray:
    """(L, E, D): the share of each domain's tokens that each expert takes (a column sums to the experts per token,
    k for a top-k), to compare with the uniform share `random_share`."""
    return counts.domain_LED / np.maximum(counts.tokens_D[None, None, :], 1)


def experts_per_token(counts: RoutingCounts) -> np.ndarray:
    """(L,): the mean number of experts a token took, per layer (k for a top-k router)."""
    n_N = np.arange(counts.num_experts + 1)
    return (counts.size_LN * n_N).sum(-1) / np.maximum(counts.size_LN.sum(-1), 1)


def random_share(counts: RoutingCounts) -> np.ndarray:
    """(L,): an expert's share of tokens under random routing with the same number of experts per token (k/E), the
    baseline of the domain shares and the vocabulary specialisation."""
    experts_L = np.asarray(counts.layer_experts or [counts.num_experts] * counts.num_layers)
    return experts_per_token(counts) / experts_L


def vocab_specialisation(
    counts_LVE: np.ndarray, occurrences_V: np.ndarray, min_count: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(specialisation (L, V): the share of token v's occurrences (`occurrences_V`) that went to its most frequent
    expert, NaN for tokens seen fewer than `min_count` times; the frequency-weighted mean per layer (L,); the expert
    each token goes to most (L, V)). Random routing gives k/E (for many occurrences), a token always sent to one
    expert 1."""
    occurrences_LV = np.broadcast_to(occurrences_V, counts_LVE.shape[:2])
    top_LV = counts_LVE.max(-1)
    share_LV = np.where(occurrences_LV >= max(min_count, 1), top_LV / np.maximum(occurrences_LV, 1), np.nan)
    seen = occurrences_LV >= max(min_count, 1)
    weighted = np.array(
        [
            np.average(share_LV[l][seen[l]], weights=occurrences_LV[l][seen[l]]) if seen[l].any() else np.nan
            for l in range(len(share_LV))
        ]
    )
    return share_LV, weighted, counts_LVE.argmax(-1)


def coactivation(counts: RoutingCounts) -> np.ndarray:
    """(L, E, E): P(expert j among a token's top-k | expert i among them); the diagonal is 1 for experts that were
    chosen at all."""
    chosen_LE = np.diagonal(counts.pairs_LEE, axis1=1, axis2=2)
    return counts.pairs_LEE / np.maximum(chosen_LE[:, :, None], 1)


def layer_transitions(counts: RoutingCounts) -> np.ndarray:
    """(L - 1, E, E): P(first choice j at the next MoE layer | first choice i at this one)."""
    return counts.follow_LEE / np.maximum(counts.follow_LEE.sum(-1, keepdims=True), 1)


def repeat_rates(counts: RoutingCounts) -> dict[str, np.ndarray]:
    """Per layer: the share of consecutive token pairs with the same first-choice expert, or with a top-k expert in
    common, and the same for tokens paired at random (chance)."""
    n = max(counts.pairs_seen, 1)
    return {
        "top1": counts.repeat_L[:, 0] / n,
        "topk": counts.repeat_L[:, 1] / n,
        "top1_chance": counts.repeat_L[:, 2] / n,
        "topk_chance": counts.repeat_L[:, 3] / n,
    }


def drops_by_position(counts: RoutingCounts) -> np.ndarray:
    """(L, S): the dropped share of token slots at each position of the sequence."""
    return counts.dropped_LS / np.maximum(counts.slots_LS, 1)


def saturation(experts_TK: np.ndarray, reference_TK: np.ndarray, num_experts: int) -> tuple[float, float]:
    """(top-1 agreement, top-k agreement) of the same tokens' choices under two checkpoints: the share of tokens
    whose first choice is the reference's first choice, and the mean share of a token's expert set that is in the
    reference's set (1 = saturated: the router no longer changes its mind; random routers give about k/E). Sets of
    any size, padded with `num_experts` (no expert); a token with no expert agrees where the reference has none."""
    E = num_experts
    top1 = float((experts_TK[:, 0] == reference_TK[:, 0]).mean())
    mine = np.zeros((len(experts_TK), E + 1), dtype=bool)
    ref = np.zeros_like(mine)
    np.put_along_axis(mine, experts_TK, True, axis=1)
    np.put_along_axis(ref, reference_TK, True, axis=1)
    mine, ref = mine[:, :E], ref[:, :E]
    size_T = mine.sum(1)
    share_T = np.where(size_T > 0, (mine & ref).sum(1) / np.maximum(size_T, 1), ~ref.any(1))
    return top1, float(share_T.mean())
