"""Routers: which experts see which tokens, and with what weight.

Shape legend (suffixes on tensor names):
    T  tokens in the layer's input (batch * sequence, flattened, batch-major)
    B  sequences in the batch           S  positions per sequence
    D  d_model                           E  routed experts
    K  experts chosen per token          C  tokens chosen per expert (expert choice)
    G  expert groups                     V  vocabulary
    N  routing slots: one (token, expert, weight) decision each
    K1 K + 1 (the noisy top-k's threshold)   1  a dimension of size one, for broadcasting
    e  experts in one group, g  groups chosen per token, k  experts chosen in each chosen group (hierarchical)

A router turns the layer's input into a `Routing`: a list of slots, each sending one token to one expert with one
weight. Token-choice routers make K slots per token, ordered k-major (slot n is token n % T's (n // T)-th choice, so
every token's first choice comes before any token's second choice: GShard's priority when capacity runs out);
expert-choice routers make C slots per expert, expert-major; a router with a variable number of experts per token
(Config.variable_k: top-p) makes K slots per token and sends the ones a token does not take to no expert, id E. The
MoE layer never asks which kind of router it has: capacity, dispatch, combine and the statistics all read slots.

A router is a module and its settings: a subclass of `Router` here whose `Config` is a subclass of `RouterConfig`
(`router_configs.py`, which needs no torch). Subclassing registers both under the Config's `name`; nothing else
keeps a list of routers. What a router can do is declared by the Config's class-level capability flags (has_gate,
uses_capacity, token_choice, smooth_load, needs_domain, variable_k; see router_configs.py), which every check reads
(never the router's name), and by the instance properties `causal` and `stochastic` (draws random numbers in
training). A router reads what it needs from one `RouterInputs` (hidden states, token ids, batch size, capacity
factor, domain labels, a selection to replay). Routers compute in float32 whatever the autocast dtype, as every
production MoE does (Megatron-Core, DeepSpeed, HF): bf16 logits make top-k choices noisy.

Each router's class docstring cites its paper; `moe-lab train --help` lists the registered ones with a line each
(the Config's `summary`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.model.checkpointing import counts_load
from moe_lab.model.losses import load_balance_loss, router_z_loss
from moe_lab.model.replay import Selection, overridden_pairs, overridden_slots
from moe_lab.model.router_configs import (
    AuxFreeRouterConfig,
    DomainOracleConfig,
    ExpertChoiceRouterConfig,
    HashRouterConfig,
    HierarchicalRouterConfig,
    NoisyTopKRouterConfig,
    NullExpertRouterConfig,
    ReLURouterConfig,
    RouterConfig,
    SinkhornRouterConfig,
    SoftRouterConfig,
    SwitchRouterConfig,
    TopKRouterConfig,
    TopPRouterConfig,
    router_config,
)


@dataclass
class Routing:
    """A router's decisions, as slots: slot n sends token `token_N[n]` to expert `expert_N[n]` with weight
    `weight_N[n]`.

    `probs_TE` is a distribution over all experts per token (it sums to one), for the load-balancing losses and the
    entropy metric; `logits_TE` feeds the z-loss. Routers without a learned gate leave both None.
    """

    expert_N: torch.Tensor  # int64
    # int64, the token of each slot; None for token choice's k-major slots, whose token is n mod T (`token_N` builds
    # it when read: the training step never needs it whole, see `tokens_of`).
    slot_tokens_N: Optional[torch.Tensor]
    weight_N: torch.Tensor  # float32, the weight combining this expert's output into the token's
    num_tokens: int  # T
    num_experts: int  # E
    # "token": K slots per token, k-major (token choice); "expert": C slots per expert, expert-major (expert choice).
    slots_by: str = "token"
    probs_TE: Optional[torch.Tensor] = None  # float32
    logits_TE: Optional[torch.Tensor] = None  # float32
    z_loss: Optional[torch.Tensor] = None  # set by routers whose z-loss is not logsumexp(logits_TE)^2
    # Set by routers whose Switch loss counts more choices than the E experts (null experts: all E + Z, AdaMoE).
    balance_loss: Optional[torch.Tensor] = None
    # Losses the router owns and weights itself (ReLU routing's L1 penalty, whose coefficient it adapts): added to
    # the training loss as they are, under their names (the Config's `own_losses`).
    own_losses: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # Identity experts (LongCat-Flash): each token's summed weight on them; the layer adds identity_weight_T * x to
    # its output, without a GEMM (their slots go to no expert, id E).
    identity_weight_T: Optional[torch.Tensor] = None
    load_estimate_E: Optional[torch.Tensor] = None  # Shazeer's smooth, differentiable load (noisy_topk)
    unrouted_slots: Optional[torch.Tensor] = None  # expert choice: slots a token-choice top-k would have had
    overridden_slots: Optional[torch.Tensor] = None  # replay: replayed slots the live router would not have chosen
    # Variable experts per token (Config.variable_k): some slots go to no expert, expert id E (weight 0).
    skips: bool = False

    @property
    def token_N(self) -> torch.Tensor:
        """int64 (N,): the token of each slot."""
        if self.slot_tokens_N is None:
            K = self.expert_N.numel() // max(self.num_tokens, 1)
            self.slot_tokens_N = torch.arange(self.num_tokens, device=self.expert_N.device).repeat(K)
        return self.slot_tokens_N

    def tokens_of(self, slots_R: torch.Tensor) -> torch.Tensor:
        """The token of each of the slots `slots_R` (one operation: k-major slot n is token n mod T)."""
        if self.slot_tokens_N is None:
            return torch.remainder(slots_R, self.num_tokens)
        return self.slot_tokens_N.index_select(0, slots_R)

    @property
    def active_N(self) -> Optional[torch.Tensor]:
        """Which slots go to an expert (None: all of them)."""
        return self.expert_N < self.num_experts if self.skips else None

    def experts_per_token_T(self) -> torch.Tensor:
        """(T,) float32: how many experts each token went to (before capacity), on the device."""
        ones_N = torch.ones_like(self.weight_N, dtype=torch.float32)
        if self.skips:
            ones_N = (self.expert_N < self.num_experts).float()
        return torch.zeros(self.num_tokens, device=ones_N.device).index_add_(0, self.token_N, ones_N)

    @classmethod
    def from_token_choice(
        cls, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, **extras: Any
    ) -> "Routing":
        """Each token's K choices (T, K) as k-major slots; their tokens are built only when read (`token_N`)."""
        T = expert_ids_TK.shape[0]
        return cls(expert_ids_TK.t().reshape(-1), None, weights_TK.t().reshape(-1), T, num_experts, "token", **extras)

    @classmethod
    def from_expert_choice(
        cls, token_ids_EC: torch.Tensor, weights_EC: torch.Tensor, num_tokens: int, **extras: Any
    ) -> "Routing":
        """Each expert's C chosen tokens (E, C) as expert-major slots."""
        E, C = token_ids_EC.shape
        expert_N = torch.arange(E, device=token_ids_EC.device).repeat_interleave(C)
        return cls(expert_N, token_ids_EC.reshape(-1), weights_EC.reshape(-1), num_tokens, E, "expert", **extras)

    # Views for reading a routing as the papers draw it.

    @property
    def expert_ids_TK(self) -> torch.Tensor:
        """(T, K) experts of each token (token choice)."""
        self._need("token")
        return self.expert_N.view(-1, self.num_tokens).t()

    @property
    def weights_TK(self) -> torch.Tensor:
        self._need("token")
        return self.weight_N.view(-1, self.num_tokens).t()

    @property
    def token_ids_EC(self) -> torch.Tensor:
        """(E, C) tokens of each expert (expert choice)."""
        self._need("expert")
        return self.token_N.view(self.num_experts, -1)

    @property
    def weights_EC(self) -> torch.Tensor:
        self._need("expert")
        return self.weight_N.view(self.num_experts, -1)

    def _need(self, slots_by: str) -> None:
        if self.slots_by != slots_by:
            raise ValueError(f"this routing has slots by {self.slots_by}, not by {slots_by}")


@dataclass(frozen=True)
class RouterInputs:
    """Everything a router may route by; the layer fills it once per call and each router reads what it needs."""

    x_TD: torch.Tensor  # the layer's input, flattened batch-major
    token_ids_T: Optional[torch.Tensor] = None  # int64, for routers that route by id (hash)
    batch_size: int = 1  # B: T = B * S, for routers that split the tokens into sequences (causal expert choice)
    capacity_factor: Optional[float] = None  # the layer's current one (training or eval), for routers that are one
    domain_T: Optional[torch.Tensor] = None  # int64, each token's data domain, for routers with needs_domain
    # A recorded selection to take instead of the router's own (replay.py): the router still computes its scores
    # and weights the replayed experts by them.
    replay: Optional[Selection] = None


# Every router's module by registered name: filled by subclassing Router (with its own Config).
ROUTERS: dict[str, type["Router"]] = {}


def normalized_sigmoid(logits_TE: torch.Tensor) -> torch.Tensor:
    """sigmoid(l_i) / sum_j sigmoid(l_j), computed as softmax(logsigmoid(l)): no epsilon to exploit.

    With `s / (s.sum() + eps)` a router can push every sigmoid below eps and drive the load-balancing loss under
    its minimum of 1 (Megatron-LM issue 1545, OLMo-core PR 255). In log space there is no eps and no underflow.
    """
    return F.logsigmoid(logits_TE).softmax(dim=-1)


class Router(nn.Module):
    """Base class: a linear gate from d_model to E logits, kept in float32 (routers with has_gate=False have none).

    A subclass with its own `Config` is registered under `Config.name`: `router=NAME` builds it."""

    Config: ClassVar[type[RouterConfig]] = RouterConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" not in cls.__dict__:
            return  # a shared base of several routers
        name = cls.Config.__dict__.get("name")
        if not isinstance(name, str):
            raise TypeError(
                f"{cls.__name__}.Config = {cls.Config.__name__} must set its own name default (the NAME of router=NAME)"
            )
        known = ROUTERS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"router {name!r} is defined twice ({known.__name__} and {cls.__name__})")
        ROUTERS[name] = cls

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        cfg: RouterConfig,
        init_std: float = 0.02,
        vocab_size: Optional[int] = None,
    ):
        super().__init__()
        cfg.check(num_experts)
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = cfg.experts_per_token(num_experts)
        if self.has_gate:
            # (E, D): stored in float32 even under bf16 autocast; the routing math never leaves float32.
            self.gate_ED = nn.Parameter(torch.empty(num_experts, d_model))
            nn.init.normal_(self.gate_ED, std=init_std)

    # The capability flags of the router's Config (see router_configs.py).
    registered_name = property(lambda self: self.cfg.name)
    has_gate = property(lambda self: self.Config.has_gate)
    uses_capacity = property(lambda self: self.Config.uses_capacity)
    token_choice = property(lambda self: self.Config.token_choice)
    smooth_load = property(lambda self: self.Config.smooth_load)
    needs_domain = property(lambda self: self.Config.needs_domain)

    @property
    def causal(self) -> bool:
        """Eval-mode routing of a token depends on no later token (given dropless capacity): the causality test
        holds every router that says so."""
        return True

    @property
    def stochastic(self) -> bool:
        """Draws random numbers in training (the trainer seeds them per micro-batch, see training/module.py)."""
        return False

    def gate_logits(self, x_TD: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float32 logits (T, E), computed outside autocast."""
        weight = self.gate_ED if weight is None else weight
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), weight.float())

    def forward(self, inputs: RouterInputs) -> Routing:
        """Route the T tokens of `inputs.x_TD`."""
        raise NotImplementedError

    def choose(self, inputs: RouterInputs, live_TK: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The experts a token-choice router goes on with: its own top-k `live_TK`, or under replay the recorded
        ones, with the count of decisions replay overrode (a Routing extra). The caller weights them from its own
        full scores, so the gate keeps its gradient at replayed experts outside its own top-k (replay.py)."""
        if inputs.replay is None:
            return live_TK, {}
        replayed_TK = inputs.replay.expert_ids_TK
        return replayed_TK, {"overridden_slots": overridden_slots(live_TK, replayed_TK)}

    def after_optimizer_step(self, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """Called once per optimizer step; `all_reduce` sums a tensor over data-parallel ranks. Most routers learn
        by gradient only and do nothing here."""


# ------------------------------------------------------------------------------------------------------------
# Token choice: softmax or sigmoid scores, top-k


def scores_of(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    return logits_TE.softmax(dim=-1) if score == "softmax" else torch.sigmoid(logits_TE)


def probs_of(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    """A distribution over experts for the aux losses: the softmax, or the normalised sigmoid."""
    return logits_TE.softmax(dim=-1) if score == "softmax" else normalized_sigmoid(logits_TE)


def limit_to_groups(choice_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Mask (to -inf) every expert outside each token's topk_groups best groups (DeepSeek-V3 eq. 12-13)."""
    T, E = choice_TE.shape
    grouped_TGE = choice_TE.view(T, num_groups, E // num_groups)
    per_group = min(2, E // num_groups)
    group_score_TG = grouped_TGE.topk(per_group, dim=-1).values.sum(-1)
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_score_TG.topk(topk_groups, dim=-1).indices, True)
    return grouped_TGE.masked_fill(~keep_TG[:, :, None], float("-inf")).view(T, E)


class TopKRouter(Router):
    """Scores over all experts, then the top-k (GShard, Lepikhin et al. 2020; Mixtral, Jiang et al. 2024).

    Softmax scores are taken over all E experts before the top-k, so the load-balance loss sees a distribution over
    every expert; `normalize` rescales the k chosen weights to sum to one. `score=sigmoid`, `num_groups` and
    `topk_groups` give DeepSeek-V3's routing (without its bias: that is `router=aux_free`); `gate_bias` gpt-oss's.
    """

    Config = TopKRouterConfig
    cfg: TopKRouterConfig  # this router's own settings

    def __init__(self, d_model, num_experts, cfg, init_std=0.02, vocab_size=None):
        super().__init__(d_model, num_experts, cfg, init_std, vocab_size)
        self.gate_bias_E = nn.Parameter(torch.zeros(num_experts)) if cfg.gate_bias else None

    def gate_logits(self, x_TD: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits_TE = super().gate_logits(x_TD, weight)
        return logits_TE if self.gate_bias_E is None else logits_TE + self.gate_bias_E.float()

    def select(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """The top-k experts of each token under `choice_TE`, within its best groups when routing is grouped."""
        if self.cfg.num_groups > 1:
            choice_TE = limit_to_groups(choice_TE, self.cfg.num_groups, self.cfg.topk_groups)
        return choice_TE.topk(self.top_k, dim=-1).indices

    def combine_weights(self, scores_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if self.cfg.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK if self.cfg.scaling_factor == 1.0 else weights_TK * self.cfg.scaling_factor

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        logits_TE = self.gate_logits(x_TD)
        scores_TE = scores_of(logits_TE, self.cfg.score)
        expert_ids_TK, replayed = self.choose(inputs, self.select(scores_TE))
        return Routing.from_token_choice(
            expert_ids_TK,
            self.combine_weights(scores_TE, expert_ids_TK),
            self.num_experts,
            probs_TE=scores_TE if self.cfg.score == "softmax" else probs_of(logits_TE, self.cfg.score),  # one softmax
            logits_TE=logits_TE,
            **replayed,
        )


# ------------------------------------------------------------------------------------------------------------
# Noisy top-k (Shazeer et al. 2017)


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 3-5).

    H(x)_i = (x W_g)_i + N(0, 1) * softplus((x W_noise)_i) in training, (x W_g)_i in evaluation; the gate is
    softmax(KeepTopK(H, k)). The learned, input-dependent noise spreads load while the router is uncertain, and makes
    the expected load a smooth function of the gates (`load_estimate_E`, for `aux_loss=cv`). Deterministic in eval.
    """

    Config = NoisyTopKRouterConfig
    cfg: NoisyTopKRouterConfig  # this router's own settings

    @property
    def stochastic(self) -> bool:
        return True

    def __init__(self, d_model, num_experts, cfg, init_std=0.02, vocab_size=None):
        super().__init__(d_model, num_experts, cfg, init_std, vocab_size)
        # Zero init as the paper: training starts with a noise std of softplus(0) = 0.69.
        self.noise_ED = nn.Parameter(torch.zeros(num_experts, d_model))

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        logits_TE = self.gate_logits(x_TD)
        probs_TE, load_estimate_E = logits_TE.softmax(-1), None
        if self.training:
            noise_std_TE = F.softplus(self.gate_logits(x_TD, self.noise_ED)) + self.cfg.min_noise_std
            noisy_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
            load_estimate_E = self._load_estimate(logits_TE, noisy_TE, noise_std_TE)
            probs_TE = noisy_TE.softmax(-1)
        else:
            noisy_TE = logits_TE
        expert_ids_TK, replayed = self.choose(inputs, noisy_TE.topk(self.top_k, dim=-1).indices)
        return Routing.from_token_choice(
            expert_ids_TK,
            noisy_TE.gather(1, expert_ids_TK).softmax(dim=-1),  # softmax over the chosen (noisy) logits
            self.num_experts,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
            load_estimate_E=load_estimate_E,
            **replayed,
        )

    def _load_estimate(self, clean_TE, noisy_TE, noise_std_TE) -> torch.Tensor:
        """Sum over tokens of P(expert i stays in the top-k when only its own noise is redrawn) (eq. 8-9)."""
        k = self.top_k
        if k == self.num_experts:
            return torch.full((self.num_experts,), float(clean_TE.shape[0]), device=clean_TE.device)
        top_TK1 = noisy_TE.topk(k + 1, dim=-1).values
        in_top_TE = noisy_TE >= top_TK1[:, k - 1 : k]
        # Threshold to beat: the k-th largest of the others = (k+1)-th if i is in the top-k, else the k-th.
        threshold_TE = torch.where(in_top_TE, top_TK1[:, k : k + 1], top_TK1[:, k - 1 : k])
        normal = torch.distributions.Normal(0.0, 1.0)
        return normal.cdf((clean_TE - threshold_TE) / noise_std_TE).sum(0)


# ------------------------------------------------------------------------------------------------------------
# Switch (Fedus et al. 2021)


class SwitchRouter(Router):
    """Switch routing (Fedus et al. 2021): each token goes to its single most probable expert, weighted by that
    probability (not renormalised), with multiplicative input jitter in training for exploration. Known for
    simplicity and speed at scale, and for needing a capacity factor and the load-balancing loss."""

    Config = SwitchRouterConfig
    cfg: SwitchRouterConfig  # this router's own settings

    @property
    def stochastic(self) -> bool:
        return self.cfg.jitter_eps > 0

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        expert_ids_TK, replayed = self.choose(inputs, probs_TE.argmax(dim=-1, keepdim=True))
        return Routing.from_token_choice(
            expert_ids_TK,
            probs_TE.gather(1, expert_ids_TK),
            self.num_experts,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
            **replayed,
        )


# ------------------------------------------------------------------------------------------------------------
# Expert choice (Zhou et al. 2022)


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

    Each expert takes exactly its capacity C = ceil(capacity_factor * T * top_k / E) tokens of the micro-batch, the
    ones with the highest softmax affinity for it, so load is perfectly balanced by construction and no aux loss is
    needed; a token may get any number of experts, none included (then only the residual carries it). `top_k` is the
    average number of experts per token. NOT causal with `causal=false` (the paper's setting): experts choose across
    all positions. `causal=true` chooses within each position's slice of the batch instead (capacity per expert and
    position = ceil(capacity_factor * B * top_k / E)); its routing then depends on the batch size.
    """

    Config = ExpertChoiceRouterConfig
    cfg: ExpertChoiceRouterConfig  # this router's own settings

    @property
    def causal(self) -> bool:
        return self.cfg.causal

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        T, E = x_TD.shape[0], self.num_experts
        capacity_factor = inputs.capacity_factor or 1.0  # dropless has no meaning here: one fair share per expert
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.cfg.causal:
            B = inputs.batch_size
            S = T // B
            capacity = min(B, math.ceil(capacity_factor * B * self.top_k / E))
            probs_SEB = probs_TE.view(B, S, E).permute(1, 2, 0)
            top = probs_SEB.topk(capacity, dim=-1)  # each expert, at each position, picks among the B sequences
            positions_S11 = torch.arange(S, device=x_TD.device).view(S, 1, 1)
            token_ids_SEC = top.indices * S + positions_S11  # (sequence, position) -> flat token index
            token_ids_EC = token_ids_SEC.permute(1, 0, 2).reshape(E, S * capacity)
            weights_EC = top.values.permute(1, 0, 2).reshape(E, S * capacity)
        else:
            capacity = min(T, math.ceil(capacity_factor * T * self.top_k / E))
            top = probs_TE.t().topk(capacity, dim=-1)
            token_ids_EC, weights_EC = top.indices, top.values
        replayed = {}
        if inputs.replay is not None:  # the recorded tokens of each expert, weighted by the live affinities
            live_EC, token_ids_EC = token_ids_EC, inputs.replay.token_N.view(E, -1)
            expert_EC = torch.arange(E, device=x_TD.device)[:, None].expand_as(token_ids_EC)
            weights_EC = probs_TE[token_ids_EC, expert_EC]
            live_expert_EC = torch.arange(E, device=x_TD.device)[:, None].expand_as(live_EC)
            replayed["overridden_slots"] = overridden_pairs(
                live_EC.reshape(-1), live_expert_EC.reshape(-1), token_ids_EC.reshape(-1), expert_EC.reshape(-1), E
            )
        # Slots a token-choice top-k would have used, left unrouted: tokens no expert chose, times top_k.
        chosen_T = torch.zeros(T, dtype=torch.bool, device=x_TD.device).index_fill(0, token_ids_EC.reshape(-1), True)
        return Routing.from_expert_choice(
            token_ids_EC,
            weights_EC,
            T,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
            unrouted_slots=(~chosen_T).sum() * self.top_k,
            **replayed,
        )


# ------------------------------------------------------------------------------------------------------------
# Hash (Roller et al. 2021)


class HashRouter(Router):
    """Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models"): each token id is sent to fixed,
    random experts, one per hash function, weighted equally. No learned gate, so no router loss and nothing to
    collapse; load follows the token frequencies. A pure function of the token id."""

    Config = HashRouterConfig
    cfg: HashRouterConfig  # this router's own settings
    table_VK: torch.Tensor

    def __init__(self, d_model, num_experts, cfg, init_std=0.02, vocab_size=None):
        super().__init__(d_model, num_experts, cfg, init_std, vocab_size)
        if vocab_size is None:
            raise ValueError("router=hash needs the vocabulary size")
        generator = torch.Generator().manual_seed(cfg.hash_seed)
        # Saved with the model, so a checkpoint routes the same tokens the same way whatever the RNG does later.
        self.register_buffer("table_VK", torch.randint(0, num_experts, (vocab_size, self.top_k), generator=generator))

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        if inputs.token_ids_T is None:
            raise ValueError("router=hash routes by token id; call the layer with token ids")
        expert_ids_TK, replayed = self.choose(inputs, self.table_VK[inputs.token_ids_T])
        weights_TK = torch.full(expert_ids_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        return Routing.from_token_choice(expert_ids_TK, weights_TK, self.num_experts, **replayed)


class DomainOracleRouter(Router):
    """The specialisation upper bound: every token goes to the experts of its data domain (domain d to experts
    (d k + j) mod E, j < k, weighted equally), as DEMix layers route by domain (Gururangan et al. 2022) and as the
    oracle router of the MoE Routing Testbed. No learned gate and
    no router loss (aux_loss=none); it needs the domain label, so it trains and evaluates on labelled data but cannot
    generate. A study puts a learned router beside it."""

    Config = DomainOracleConfig
    cfg: DomainOracleConfig  # this router's own settings

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        if inputs.domain_T is None:
            raise ValueError("router=domain_oracle routes by the data's domain label; call the model with domain_B")
        k = torch.arange(self.top_k, device=x_TD.device)
        live_TK = (inputs.domain_T.to(x_TD.device)[:, None] * self.top_k + k[None, :]) % self.num_experts
        expert_ids_TK, replayed = self.choose(inputs, live_TK)
        weights_TK = torch.full(expert_ids_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        return Routing.from_token_choice(expert_ids_TK, weights_TK, self.num_experts, **replayed)


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn balanced assignment (BASE, S-BASE)


def sinkhorn(logits_TE: torch.Tensor, iterations: int) -> torch.Tensor:
    """Scale exp(logits) so every token's row sums to 1 and every expert's column to T / E (Cuturi 2013)."""
    T, E = logits_TE.shape
    log_p = logits_TE - logits_TE.logsumexp(dim=-1, keepdim=True)
    for _ in range(iterations):  # a fixed, small number of rounds: a loop over iterations, not tokens
        log_p = log_p - log_p.logsumexp(dim=0, keepdim=True) + math.log(T / E)
        log_p = log_p - log_p.logsumexp(dim=1, keepdim=True)
    return log_p.exp()


class SinkhornRouter(Router):
    """Balanced assignment (BASE layers, Lewis et al. 2021; Sinkhorn-based S-BASE, Clark et al. 2022).

    In training, tokens are assigned to experts by top-k of the Sinkhorn-balanced affinity matrix, whose columns all
    carry T/E tokens' worth of mass: near-perfect balance without an aux loss. The combine weights are the
    router's own softmax probabilities, so the gate still learns. In evaluation it is plain softmax top-k (causal);
    in training the balancing couples all tokens of the micro-batch, as a capacity limit does.
    """

    Config = SinkhornRouterConfig
    cfg: SinkhornRouterConfig  # this router's own settings

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.training:
            with torch.no_grad():
                scale = logits_TE.std() * self.cfg.temperature + 1e-6
                balanced_TE = sinkhorn(logits_TE / scale, self.cfg.iterations)
                expert_ids_TK = balanced_TE.topk(self.top_k, dim=-1).indices
        else:
            expert_ids_TK = probs_TE.topk(self.top_k, dim=-1).indices
        expert_ids_TK, replayed = self.choose(inputs, expert_ids_TK)
        return Routing.from_token_choice(
            expert_ids_TK,
            probs_TE.gather(1, expert_ids_TK),
            self.num_experts,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
            **replayed,
        )


# ------------------------------------------------------------------------------------------------------------
# Aux-loss-free balancing (DeepSeek-V3)


class AuxFreeRouter(Router):
    """Auxiliary-loss-free load balancing (DeepSeek-V3 technical report 2024, section 2.1.2; Wang et al. 2024).

    Sigmoid affinities; a per-expert bias is added only to choose experts (top-k of score + bias), never to weight
    them (within the topk_groups best groups, when routing is group-limited, as DeepSeek-V3's). After each optimizer
    step, `update_bias` moves the bias by rate * sign(mean load - load), with the counts
    summed over the whole global batch: every data-parallel rank and every gradient-accumulation step since the last
    update. Balance without an aux-loss gradient interfering with the language-modelling one.
    """

    Config = AuxFreeRouterConfig
    cfg: AuxFreeRouterConfig  # this router's own settings
    bias_E: torch.Tensor
    pending_counts_E: torch.Tensor

    def __init__(self, d_model, num_experts, cfg, init_std=0.02, vocab_size=None):
        super().__init__(d_model, num_experts, cfg, init_std, vocab_size)
        self.register_buffer("bias_E", torch.zeros(num_experts))  # float32, saved in checkpoints
        # Routed token slots per expert since the last update (training only); not saved: an update empties it.
        self.register_buffer("pending_counts_E", torch.zeros(num_experts), persistent=False)

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        logits_TE = self.gate_logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        choice_TE = scores_TE + self.bias_E
        if self.cfg.num_groups > 1:
            choice_TE = limit_to_groups(choice_TE, self.cfg.num_groups, self.cfg.topk_groups)
        expert_ids_TK, replayed = self.choose(inputs, choice_TE.topk(self.top_k, dim=-1).indices)
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if self.cfg.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.training and counts_load():  # a checkpoint's recompute counts nothing again
            with torch.no_grad():
                self.pending_counts_E.scatter_add_(
                    0, expert_ids_TK.reshape(-1), torch.ones(expert_ids_TK.numel(), device=x_TD.device)
                )
        return Routing.from_token_choice(
            expert_ids_TK,
            weights_TK * self.cfg.scaling_factor,
            self.num_experts,
            probs_TE=normalized_sigmoid(logits_TE),
            logits_TE=logits_TE,
            **replayed,
        )

    def after_optimizer_step(self, all_reduce=None) -> None:
        self.update_bias(all_reduce)

    @torch.no_grad()
    def update_bias(self, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """One bias step from the counts of the whole global batch; `all_reduce` sums them over ranks."""
        counts_E = self.pending_counts_E.clone()
        if all_reduce is not None:
            counts_E = all_reduce(counts_E)
        if counts_E.sum() > 0:  # only after a training step routed tokens
            self.bias_E += self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        self.pending_counts_E.zero_()


# ------------------------------------------------------------------------------------------------------------
# Top-p: a variable number of experts per token (Huang et al. 2024; DTop-p, Jin et al. 2025)


class TopPRouter(Router):
    """Dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"): a token
    takes experts in order of softmax probability until their mass reaches the threshold p, at most top_k (the cap),
    weighted by their probabilities; a confident token takes one expert, an uncertain one several. Slots it does not
    take go to no expert (id E) and never reach the experts (dispatch sets them aside).

    With `target_experts_per_token`, p follows DTop-p's proportional-integral controller (Jin et al. 2025, arXiv
    2512.13996): after every optimizer step, p = p0 + kp e + ki sum(e) with e = target - the global batch's experts
    per token (summed over accumulation steps and data-parallel ranks, as aux_free's counts), so a comparison with
    top-k is at equal compute. The threshold and the controller's sum are buffers: saved with the model.
    """

    Config = TopPRouterConfig
    cfg: TopPRouterConfig  # this router's own settings
    threshold: torch.Tensor
    error_sum: torch.Tensor
    pending_TK: torch.Tensor

    def __init__(self, d_model, num_experts, cfg, init_std=0.02, vocab_size=None):
        super().__init__(d_model, num_experts, cfg, init_std, vocab_size)
        self.register_buffer("threshold", torch.tensor(float(cfg.threshold)))
        self.register_buffer("error_sum", torch.zeros(()))
        # Experts taken and tokens routed since the last controller step (training only; not saved).
        self.register_buffer("pending_TK", torch.zeros(2), persistent=False)

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD, E = inputs.x_TD, self.num_experts
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top = probs_TE.topk(self.top_k, dim=-1)
        mass_before_TK = top.values.cumsum(-1) - top.values  # the first expert is always taken
        taken_TK = mass_before_TK < self.threshold
        expert_ids_TK, replayed = self.choose(inputs, torch.where(taken_TK, top.indices, E))
        real_TK = expert_ids_TK < E
        weights_TK = probs_TE.gather(1, expert_ids_TK.clamp(max=E - 1)) * real_TK
        if self.cfg.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp(min=1e-9)
        if self.training and counts_load():  # a checkpoint's recompute counts nothing again
            with torch.no_grad():
                self.pending_TK[0] += real_TK.sum()  # experts taken
                self.pending_TK[1] += x_TD.shape[0]  # tokens: a Python number, no copy to the device
        return Routing.from_token_choice(
            expert_ids_TK, weights_TK, E, probs_TE=probs_TE, logits_TE=logits_TE, skips=True, **replayed
        )

    @torch.no_grad()
    def after_optimizer_step(self, all_reduce=None) -> None:
        target = self.cfg.target_experts_per_token
        pending = self.pending_TK.clone()
        self.pending_TK.zero_()
        if target is None:
            return
        if all_reduce is not None:
            pending = all_reduce(pending)
        if pending[1] <= 0:
            return
        error = target - pending[0] / pending[1]
        self.error_sum += error
        p = self.cfg.threshold + self.cfg.controller_kp * error + self.cfg.controller_ki * self.error_sum
        self.threshold.copy_(p.clamp(1e-3, 1.0))


# ------------------------------------------------------------------------------------------------------------
# Null and identity experts (AdaMoE, Zeng et al. 2024; LongCat-Flash 2025)


class NullExpertRouter(Router):
    """Top-k among E experts and Z null experts (AdaMoE, Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null
    Experts"; LongCat-Flash, Meituan 2025, "zero-computation experts"): one softmax over all E + Z gate logits, the
    top-k of it; a token whose choices include null experts computes fewer real ones. Null slots go to no expert (id
    E): dispatch sets them aside before the grouped GEMM, so they cost no FLOPs. A "zero" null expert returns
    nothing; an "identity" one returns the token, added by the layer as w * x (`Routing.identity_weight_T`).

    AdaMoE balances with the Switch loss over all E + Z choices (`Routing.balance_loss`), which sets the null share
    to Z / (E + Z) of the slots. LongCat-Flash's controller (`target_experts_per_token`) adds a bias to the real
    experts' scores, used only to choose them, moved after each optimizer step towards the target's share: the
    average number of real experts per token holds at the target whatever the gradient prefers.
    """

    Config = NullExpertRouterConfig
    cfg: NullExpertRouterConfig  # this router's own settings
    bias_E: torch.Tensor
    pending_counts_E: torch.Tensor
    pending_tokens: torch.Tensor

    def __init__(self, d_model, num_experts, cfg, init_std=0.02, vocab_size=None):
        super().__init__(d_model, num_experts, cfg, init_std, vocab_size)
        # The null experts' gate rows apart from the real ones' (`gate_ED`): pruning keeps them all.
        self.null_gate_ZD = nn.Parameter(torch.empty(cfg.num_null_experts, d_model))
        nn.init.normal_(self.null_gate_ZD, std=init_std)
        self.register_buffer("bias_E", torch.zeros(num_experts))  # the controller's; zero without a target
        # Real slots per expert and tokens since the last controller step (training only; not saved).
        self.register_buffer("pending_counts_E", torch.zeros(num_experts), persistent=False)
        self.register_buffer("pending_tokens", torch.zeros(()), persistent=False)

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD, E = inputs.x_TD, self.num_experts
        logits_TX = torch.cat([self.gate_logits(x_TD), self.gate_logits(x_TD, self.null_gate_ZD)], -1)  # X = E + Z
        scores_TX = logits_TX.softmax(dim=-1)
        choice_TX = scores_TX + F.pad(self.bias_E, (0, self.cfg.num_null_experts))
        live_TK = choice_TX.topk(self.top_k, dim=-1).indices  # null experts, unbiased, come best first
        expert_ids_TK, replayed = self.choose(inputs, live_TK.clamp(max=E))
        real_TK = expert_ids_TK < E
        # A token's null slots take its null experts best first (what its own top-k chose, and how a replayed null
        # slot, recorded only as "no expert", is weighted).
        null_order_TZ = scores_TX[:, E:].argsort(dim=-1, descending=True)
        null_rank_TK = ((~real_TK).cumsum(-1) - 1).clamp(0, self.cfg.num_null_experts - 1)
        choice_ids_TK = torch.where(real_TK, expert_ids_TK, E + null_order_TZ.gather(1, null_rank_TK))
        weights_TK = scores_TX.gather(1, choice_ids_TK)
        if self.cfg.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        counts_X = torch.zeros(logits_TX.shape[1], device=x_TD.device).index_add_(
            0, choice_ids_TK.reshape(-1), torch.ones(choice_ids_TK.numel(), device=x_TD.device)
        )
        if self.training and counts_load():  # a checkpoint's recompute counts nothing again
            with torch.no_grad():
                self.pending_counts_E += counts_X[:E]
                self.pending_tokens += x_TD.shape[0]
        identity_T = (weights_TK * ~real_TK).sum(-1) if self.cfg.null_kind == "identity" else None
        real_scores_TE = scores_TX[:, :E]
        return Routing.from_token_choice(
            expert_ids_TK,
            weights_TK * real_TK,
            E,
            probs_TE=real_scores_TE / real_scores_TE.sum(-1, keepdim=True),  # over the real experts
            logits_TE=logits_TX[:, :E],
            z_loss=router_z_loss(logits_TX),
            balance_loss=load_balance_loss(scores_TX, counts_X),  # over all E + Z choices, as AdaMoE
            identity_weight_T=identity_T,
            skips=True,
            **replayed,
        )

    @torch.no_grad()
    def after_optimizer_step(self, all_reduce=None) -> None:
        """LongCat-Flash's bias step: mu * (target / (k E) - T_i / (k T_all)) for each real expert i."""
        counts_E, tokens = self.pending_counts_E.clone(), self.pending_tokens.clone()
        self.pending_counts_E.zero_()
        self.pending_tokens.zero_()
        target = self.cfg.target_experts_per_token
        if target is None:
            return
        if all_reduce is not None:
            counts_E, tokens = all_reduce(counts_E), all_reduce(tokens)
        if tokens <= 0:
            return
        k, E = self.top_k, self.num_experts
        self.bias_E += self.cfg.bias_update_rate * (target / (k * E) - counts_E / (k * tokens))


# ------------------------------------------------------------------------------------------------------------
# ReLU routing (ReMoE, Wang et al. 2025)


class ReLURouter(Router):
    """ReLU routing (Wang, Zhu & Chen 2025, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing"):
    gates g = ReLU(x W), and a token goes to every expert whose gate is positive, weighted by it; no top-k, no
    softmax, so routing is continuous in the gate and a token takes any number of experts, none included (then only
    the residual carries it). Sparsity comes from an L1 penalty on the gates, load-balanced as the Switch loss is
    (lambda * E * sum_i f_i * mean_t g_ti, f_i = expert i's slots / (T k)), whose coefficient lambda is multiplied
    by 1.2 after every optimizer step when fewer than 1 - k/E of the gates are zero and divided by it otherwise,
    steering the average number of experts per token towards k. Training starts dense (lambda_0 = 1e-8) and
    sparsifies; a gate ReLU has closed gets no gradient to reopen, so a layer that overshoots below k can stay there
    (experiments/2026-12-06_null_and_relu_routing: 0.7-1.35 in three of the default model's four layers).
    Under replay, a replayed expert whose live gate is zero weighs zero, as in its own forward.
    """

    Config = ReLURouterConfig
    cfg: ReLURouterConfig  # this router's own settings
    l1_coefficient: torch.Tensor
    pending_active: torch.Tensor

    def __init__(self, d_model, num_experts, cfg, init_std=0.02, vocab_size=None):
        super().__init__(d_model, num_experts, cfg, init_std, vocab_size)
        self.register_buffer("l1_coefficient", torch.tensor(float(cfg.l1_coefficient)))  # saved with the model
        # Positive gates and gates in all since the last coefficient step (training only; not saved).
        self.register_buffer("pending_active", torch.zeros(2), persistent=False)

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD, E = inputs.x_TD, self.num_experts
        logits_TE = self.gate_logits(x_TD)
        gates_TE = F.relu(logits_TE)
        every_TE = torch.arange(E, device=x_TD.device).expand(x_TD.shape[0], E)
        expert_ids_TK, replayed = self.choose(inputs, torch.where(gates_TE > 0, every_TE, E))
        real_TK = expert_ids_TK < E
        weights_TK = gates_TE.gather(1, expert_ids_TK.clamp(max=E - 1)) * real_TK
        counts_E = torch.zeros(E + 1, device=x_TD.device).index_add_(
            0, expert_ids_TK.reshape(-1), torch.ones(expert_ids_TK.numel(), device=x_TD.device)
        )[:E]
        l1 = E * (counts_E / (x_TD.shape[0] * self.cfg.top_k) * gates_TE.mean(0)).sum()
        if self.training and counts_load():  # a checkpoint's recompute counts nothing again
            with torch.no_grad():
                self.pending_active[0] += counts_E.sum()
                self.pending_active[1] += gates_TE.numel()
        return Routing.from_token_choice(
            expert_ids_TK,
            weights_TK,
            E,
            probs_TE=gates_TE / gates_TE.sum(-1, keepdim=True).clamp(min=1e-9),  # a token with no expert: zeros
            logits_TE=logits_TE,
            own_losses={"relu_l1": self.l1_coefficient * l1},
            skips=True,
            **replayed,
        )

    @torch.no_grad()
    def after_optimizer_step(self, all_reduce=None) -> None:
        pending = self.pending_active.clone()
        self.pending_active.zero_()
        if all_reduce is not None:
            pending = all_reduce(pending)
        if pending[1] <= 0:
            return
        sparsity = 1 - pending[0] / pending[1]
        target = 1 - self.cfg.top_k / self.num_experts
        self.l1_coefficient *= self.cfg.l1_multiplier ** torch.sign(target - sparsity)


# ------------------------------------------------------------------------------------------------------------
# The dense soft mixture (Jacobs et al. 1991)


class SoftMixtureRouter(Router):
    """Adaptive mixtures of local experts (Jacobs, Jordan, Nowlan & Hinton 1991), where MoE began: every expert
    runs on every token and the gate's softmax weights combine them. The historical baseline: dense compute (E
    times a top-1 MoE), no routing decisions, no drops. Slow by nature."""

    Config = SoftRouterConfig
    cfg: SoftRouterConfig  # this router's own settings

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        every_TK = torch.arange(self.num_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
        expert_ids_TK, replayed = self.choose(inputs, every_TK)  # a replayed order of the E experts
        return Routing.from_token_choice(
            expert_ids_TK,
            probs_TE.gather(1, expert_ids_TK),
            self.num_experts,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
            **replayed,
        )


# ------------------------------------------------------------------------------------------------------------
# Hierarchical mixtures (Jordan & Jacobs 1994)


class HierarchicalRouter(Router):
    """Hierarchical mixtures of experts (Jordan & Jacobs 1994): a gate picks among groups of experts, a second gate
    picks within the group. Here both levels are sparse: the top group_top_k groups, then the top_k experts of each,
    weighted by p(group) * p(expert | group). A tree-structured router with far fewer logits per decision."""

    Config = HierarchicalRouterConfig
    cfg: HierarchicalRouterConfig  # this router's own settings

    def __init__(self, d_model, num_experts, cfg, init_std=0.02, vocab_size=None):
        super().__init__(d_model, num_experts, cfg, init_std, vocab_size)
        self.group_gate_GD = nn.Parameter(torch.empty(cfg.num_groups, d_model))
        nn.init.normal_(self.group_gate_GD, std=init_std)

    def forward(self, inputs: RouterInputs) -> Routing:
        x_TD = inputs.x_TD
        G, Eg = self.cfg.num_groups, self.num_experts // self.cfg.num_groups
        group_logits_TG = self.gate_logits(x_TD, self.group_gate_GD)
        expert_logits_TGe = self.gate_logits(x_TD).view(-1, G, Eg)  # the within-group gates
        p_group_TG = group_logits_TG.softmax(-1)
        p_within_TGe = expert_logits_TGe.softmax(-1)
        joint_TE = (p_group_TG[:, :, None] * p_within_TGe).flatten(1)  # a distribution over all E experts
        groups_Tg = p_group_TG.topk(self.cfg.group_top_k, dim=-1).indices
        within_Tgk = p_within_TGe.gather(1, groups_Tg[:, :, None].expand(-1, -1, Eg)).topk(self.cfg.top_k, -1).indices
        expert_ids_TK, replayed = self.choose(inputs, (groups_Tg[:, :, None] * Eg + within_Tgk).flatten(1))
        weights_TK = joint_TE.gather(1, expert_ids_TK)
        if self.cfg.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        z_loss = (
            torch.logsumexp(group_logits_TG, -1).square().mean()
            + torch.logsumexp(expert_logits_TGe, -1).square().mean()
        ) / 2
        return Routing.from_token_choice(
            expert_ids_TK,
            weights_TK,
            self.num_experts,
            probs_TE=joint_TE,
            logits_TE=joint_TE.log(),
            z_loss=z_loss,
            **replayed,
        )


def build_router(
    d_model: int,
    num_experts: int,
    cfg: RouterConfig | Mapping[str, Any],
    init_std: float = 0.02,
    vocab_size: Optional[int] = None,
) -> Router:
    """The registered router that `cfg` names (a Config, or its plain-dict form as checkpoints store it)."""
    cfg = router_config(cfg)
    if cfg.name not in ROUTERS:
        raise ValueError(
            f"router={cfg.name} has settings ({type(cfg).__name__}) but no Router subclass with "
            f"Config = {type(cfg).__name__}"
        )
    return ROUTERS[cfg.name](d_model, num_experts, cfg, init_std=init_std, vocab_size=vocab_size)
