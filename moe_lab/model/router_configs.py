"""The routers' settings: one dataclass per router, the schemas behind `router=NAME`.

They live apart from the routers themselves (`routers.py`) so that the configuration (Hydra's schemas, the
command-line check, shell completion) needs no torch. A router is two classes and nothing else: its settings here,
a subclass of `RouterConfig` whose `name` default is the name users type (`router=NAME`), and its module in
`routers.py`, a subclass of `Router` whose `Config` is that class. Subclassing registers both: `router=NAME` then
composes (with or without a `conf/router/NAME.yaml`, which only adds a description), `moe-lab train --help` lists
it, and every check and list of routers reads the capability flags below, never a router's name.

A router defined outside moe-lab (both classes in one module of its own) is found through the `moe_lab.routers`
entry point of the package that holds it, e.g. in its pyproject.toml:

    [project.entry-points."moe_lab.routers"]
    my_router = "my_package.my_router"
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Mapping, Optional

# Every router's settings by registered name; filled by subclassing RouterConfig (and by `load_router_plugins`).
ROUTER_CONFIGS: dict[str, type["RouterConfig"]] = {}
PLUGIN_GROUP = "moe_lab.routers"


@dataclass
class RouterConfig:
    """Keys every router accepts; each router's Config adds its own, and declares what its router can do."""

    # Registered router name (router=NAME).
    name: str = "topk"
    # Experts per token (expert choice: the average number of experts per token).
    top_k: int = 2

    # What the router can do, read by the configuration checks, the layer, the analyses and the tests (never the
    # router's name). Class-level flags, not settings:
    # learned gate parameters: gradients reach them and the router losses apply (hash routing has none).
    has_gate: ClassVar[bool] = True
    # the layer's capacity factor limits its slots (expert choice *is* a capacity: False).
    uses_capacity: ClassVar[bool] = True
    # K slots per token, a top-k list per token (the sequence-wise balance loss and the top-k analyses need it).
    token_choice: ClassVar[bool] = True
    # gives Shazeer's differentiable load estimate (aux_loss.load needs it).
    smooth_load: ClassVar[bool] = False
    # routes by the data's domain label (trains and evaluates on labelled data only; cannot generate).
    needs_domain: ClassVar[bool] = False
    # a token takes a variable number of experts, up to top_k: its unused slots go to no expert (expert id E), which
    # dispatch sets aside before the experts run (dynamic compute: top-p routing).
    variable_k: ClassVar[bool] = False
    # Losses the router adds to the training loss itself, already weighted (ReLU routing's adaptive L1 penalty):
    # their names, as the metrics log them under aux/NAME.
    own_losses: ClassVar[tuple[str, ...]] = ()
    # The aux_loss option that `router=NAME` brings with it (a gate-less router: "none", since no router loss applies
    # to it), unless the command line names one; None keeps the configured aux_loss.
    brings_aux_loss: ClassVar[Optional[str]] = None
    # A one-line description for `moe-lab train --help` and the README's list (its paper).
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register every subclass that names itself (`name: str = "NAME"` in its body)."""
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not isinstance(name, str):
            return  # a shared base of several routers' settings: registered by its subclasses
        known = ROUTER_CONFIGS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"router {name!r} is defined twice: {known.__module__}.{known.__qualname__} and "
                f"{cls.__module__}.{cls.__qualname__}"
            )
        ROUTER_CONFIGS[name] = cls

    def check(self, num_experts: int) -> None:
        """Raise ValueError naming the setting if the router cannot run with these settings."""
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"model.moe.router.top_k={self.top_k} must be in 1..num_experts ({num_experts})")

    def experts_per_token(self, num_experts: int) -> int:
        """K: routing slots per token (expert choice: on average)."""
        return self.top_k

    def experts_computed_per_token(self, num_experts: int) -> float:
        """The experts a token is counted as computing in the active parameters and FLOPs: K, or for a variable
        number the target it is held at (its cap, an upper bound, where there is none)."""
        return float(self.experts_per_token(num_experts))

    @classmethod
    def fixed_top_k(cls) -> bool:
        """K experts for every token, first choice first: what the top-k analyses and routing traces read."""
        return cls.token_choice and not cls.variable_k

    def expert_groups(self) -> int:
        """Groups of consecutive experts the routing chooses among (1: none); pruning keeps as many of each."""
        return int(getattr(self, "num_groups", 1))

    def softmax_topk(self, num_experts: int) -> Optional[tuple[int, bool]]:
        """Eval-mode routing as a softmax top-k over the gate logits, (k, renormalise the k weights), or None when
        this router does not route that way: what Mixtral-style MoE blocks (Hugging Face export) can express."""
        return None

    def topk_softmax(self, num_experts: int) -> Optional[dict[str, Any]]:
        """Eval-mode routing as gpt-oss's: the top-k of the logits (with the gate's bias, zero if it has none), then a
        softmax over those k (= the softmax top-k renormalised). {"top_k": k} or None."""
        routing = self.softmax_topk(num_experts)
        return {"top_k": routing[0]} if routing is not None and routing[1] else None

    def sigmoid_topk(self, num_experts: int) -> Optional[dict[str, Any]]:
        """Eval-mode routing as DeepSeek-V3's: sigmoid scores, a top-k of score + a bias (zero if the router has
        none) within the topk_groups best groups, the k scores renormalised or not, then scaled. Its settings under
        Hugging Face's names, or None when this router does not route that way."""
        return None


def check_groups(cfg: Any, num_experts: int) -> None:
    """Group-limited routing's settings (num_groups, topk_groups, top_k), or ValueError naming the first bad one."""
    if cfg.num_groups < 1 or num_experts % cfg.num_groups:
        raise ValueError(f"model.moe.router.num_groups={cfg.num_groups} must divide num_experts ({num_experts})")
    if not 1 <= cfg.topk_groups <= cfg.num_groups:
        raise ValueError(f"model.moe.router.topk_groups={cfg.topk_groups} must be in 1..num_groups ({cfg.num_groups})")
    kept = cfg.topk_groups * (num_experts // cfg.num_groups)
    if cfg.top_k > kept:
        raise ValueError(
            f"model.moe.router.top_k={cfg.top_k} is more than the {cfg.topk_groups} kept groups hold ({kept} experts)"
        )


def deepseek_routing(cfg: Any) -> dict[str, Any]:
    """A sigmoid group-limited router's settings as DeepSeek-V3's config names them (top_k: num_experts_per_tok)."""
    return {
        "top_k": cfg.top_k,
        "norm_topk_prob": cfg.normalize,
        "n_group": cfg.num_groups,
        "topk_group": cfg.topk_groups,
        "routed_scaling_factor": cfg.scaling_factor,
    }


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
    # A learned bias on the gate's logits (gpt-oss), which both chooses and weights the experts.
    gate_bias: bool = False
    summary = "scores over all experts, then the top-k (GShard; Mixtral; DeepSeek-V3 with score=sigmoid)"

    def check(self, num_experts: int) -> None:
        super().check(num_experts)
        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"model.moe.router.score={self.score!r}; choose softmax or sigmoid")
        check_groups(self, num_experts)

    def softmax_topk(self, num_experts: int) -> Optional[tuple[int, bool]]:
        if self.score != "softmax" or self.num_groups > 1 or self.scaling_factor != 1.0 or self.gate_bias:
            return None  # sigmoid, group-limited or scaled routing: DeepSeek-V3's (sigmoid_topk); a bias: gpt-oss's
        return self.top_k, self.normalize

    def topk_softmax(self, num_experts: int) -> Optional[dict[str, Any]]:
        plain = self.score == "softmax" and self.num_groups == 1 and self.scaling_factor == 1.0 and self.normalize
        return {"top_k": self.top_k} if plain else None

    def sigmoid_topk(self, num_experts: int) -> Optional[dict[str, Any]]:
        return deepseek_routing(self) if self.score == "sigmoid" and not self.gate_bias else None


@dataclass
class NoisyTopKRouterConfig(RouterConfig):
    name: str = "noisy_topk"
    # Floor of the learned noise scale softplus(x W_noise) (numerical safety of the load estimator).
    min_noise_std: float = 1e-2
    smooth_load = True
    summary = "noisy top-k gating with a learned noise scale (Shazeer et al. 2017)"

    def softmax_topk(self, num_experts: int) -> Optional[tuple[int, bool]]:
        return self.top_k, True  # evaluation: softmax over the top-k clean logits = the renormalised top-k


@dataclass
class SwitchRouterConfig(RouterConfig):
    name: str = "switch"
    top_k: int = 1
    # Multiplicative input jitter x * U(1 - eps, 1 + eps) in training (Switch Transformer section 2.4).
    jitter_eps: float = 1e-2
    summary = "top-1 with input jitter (Switch Transformer, Fedus et al. 2021)"

    def check(self, num_experts: int) -> None:
        if self.top_k != 1:
            raise ValueError(
                f"router=switch sends each token to one expert; model.moe.router.top_k={self.top_k} "
                "must be 1 (use router=topk for k > 1)"
            )
        if not 0 <= self.jitter_eps < 1:
            raise ValueError(f"model.moe.router.jitter_eps={self.jitter_eps} must be in [0, 1)")

    def softmax_topk(self, num_experts: int) -> Optional[tuple[int, bool]]:
        return 1, False  # the top-1 probability, not renormalised


@dataclass
class ExpertChoiceRouterConfig(RouterConfig):
    name: str = "expert_choice"
    # false: each expert picks its top-capacity tokens among all tokens of the batch, as the paper. That reads
    # every position of a sequence, so a token's routing depends on later tokens: an LM trained this way sees the
    # future through routing and its validation loss is optimistic.
    # true: each expert picks among the tokens at the same position of the batch's sequences (one batch slice
    # per position), so no token's routing depends on a later position of any sequence.
    causal: bool = False
    uses_capacity = False  # it is a capacity: every expert takes exactly C tokens
    token_choice = False
    summary = "each expert takes its top-C tokens (Zhou et al. 2022); causal=true within each position"


@dataclass
class HashRouterConfig(RouterConfig):
    name: str = "hash"
    top_k: int = 1
    # Seed of the random hash table: expert = table[token id] (one table per k).
    hash_seed: int = 0
    has_gate = False
    brings_aux_loss = "none"
    summary = "a fixed random table of token ids, no learned gate (Hash Layers, Roller et al. 2021)"


@dataclass
class DomainOracleConfig(RouterConfig):
    name: str = "domain_oracle"
    # Experts per token, all of the token's domain: domain d takes experts (d k + j) mod E, j < k.
    top_k: int = 1
    has_gate = False
    brings_aux_loss = "none"
    needs_domain = True
    summary = "the experts of each token's data domain: the specialisation oracle (DEMix, Gururangan et al. 2022)"


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
    summary = "balanced assignment by Sinkhorn in training (BASE, Lewis et al. 2021; S-BASE, Clark et al. 2022)"

    def check(self, num_experts: int) -> None:
        super().check(num_experts)
        if self.temperature <= 0 or self.iterations < 1:
            raise ValueError(
                f"router=sinkhorn needs temperature > 0 and iterations >= 1 (got {self.temperature}, {self.iterations})"
            )

    def softmax_topk(self, num_experts: int) -> Optional[tuple[int, bool]]:
        return self.top_k, False  # evaluation: softmax top-k


@dataclass
class AuxFreeRouterConfig(RouterConfig):
    name: str = "aux_free"
    # Bias step per optimizer step: b += rate * sign(mean load - load) (DeepSeek-V3's gamma = 1e-3).
    bias_update_rate: float = 1e-3
    # Renormalise the k chosen sigmoid scores (DeepSeek-V3 does).
    normalize: bool = True
    # Multiplies the combine weights (DeepSeek-V3's routed_scaling_factor, 2.5 for 256 experts).
    scaling_factor: float = 1.0
    # Group-limited routing, as router=topk's: a token keeps the topk_groups groups with the highest sum of their
    # top-2 biased scores, then picks top_k inside them (DeepSeek-V3: 8 groups, 4 kept, one per node).
    num_groups: int = 1
    topk_groups: int = 1
    summary = "sigmoid top-k with a load bias updated after each step, no aux loss needed (DeepSeek-V3 2024)"

    def check(self, num_experts: int) -> None:
        super().check(num_experts)
        check_groups(self, num_experts)

    def sigmoid_topk(self, num_experts: int) -> Optional[dict[str, Any]]:
        return deepseek_routing(self)


@dataclass
class TopPRouterConfig(RouterConfig):
    name: str = "top_p"
    # The cap: at most this many experts per token (Huang et al. take experts until the mass reaches p, uncapped;
    # a cap bounds the worst-case compute and the capacity arithmetic).
    top_k: int = 4
    # Experts are taken, most probable first, until their softmax mass reaches this threshold (Huang et al. 2024
    # set p = 0.4). With target_experts_per_token, the threshold's starting value.
    threshold: float = 0.4
    # DTop-p (Jin et al. 2025): a proportional-integral controller moves the threshold after every optimizer step
    # so that the average number of experts per token of the global batch holds at this target (2.0: top-2's
    # compute). null: a fixed threshold.
    target_experts_per_token: Optional[float] = None
    # The controller's gains: p = p0 + kp * e + ki * sum(e), e = target - experts per token (ours: the paper's were
    # not re-checked).
    controller_kp: float = 0.05
    controller_ki: float = 0.01
    # Renormalise the chosen probabilities to sum to one (Huang et al. weight by the probabilities as they are).
    normalize: bool = False
    variable_k = True
    summary = "experts taken until their probability mass reaches p, optionally held at a target (Huang et al. 2024)"

    def experts_computed_per_token(self, num_experts: int) -> float:
        target = self.target_experts_per_token
        return float(self.top_k if target is None else target)

    def check(self, num_experts: int) -> None:
        super().check(num_experts)
        if not 0 < self.threshold <= 1:
            raise ValueError(f"model.moe.router.threshold={self.threshold} must be in (0, 1]")
        target = self.target_experts_per_token
        if target is not None and not 1 <= target <= self.top_k:
            raise ValueError(
                f"model.moe.router.target_experts_per_token={target} must be in 1..top_k ({self.top_k}), the cap"
            )


@dataclass
class NullExpertRouterConfig(RouterConfig):
    name: str = "null_experts"
    # Choices per token among the E experts and the Z null experts: a token takes 0..top_k real experts. AdaMoE
    # raises Mixtral's top-2 to top-3 or top-4 beside its null experts; LongCat-Flash takes top-12 of 512 + 256.
    top_k: int = 3
    # Z: null experts beside the E real ones (AdaMoE: 4 beside Mixtral's 8; LongCat-Flash: 256 beside 512).
    num_null_experts: int = 4
    # What a null expert returns: "zero" (AdaMoE: nothing; the slot only lowers the token's compute) or "identity"
    # (LongCat-Flash: the token itself, E(x) = x, added with its gate weight).
    null_kind: str = "zero"
    # Renormalise the k chosen softmax weights (null ones included) to sum to one, as Mixtral, which AdaMoE extends;
    # LongCat-Flash does not (it scales the weights instead).
    normalize: bool = True
    # LongCat-Flash's bias controller: a bias on the real experts, used only to choose them, moves after every
    # optimizer step by rate * (target / (k E) - T_i / (k T_all)) (T_i: the global batch's slots of expert i, T_all
    # its tokens), so that a token takes this many real experts on average and the real experts are balanced.
    # null: no controller (AdaMoE: the Switch loss over all E + Z choices sets the null share).
    target_experts_per_token: Optional[float] = None
    # The controller's rate mu (ours: the shares it multiplies are of order 1 / (k E), and 0.1 moves the bias about
    # as fast as DeepSeek-V3's 1e-3 sign step; LongCat-Flash's value was not re-checked).
    bias_update_rate: float = 0.1
    variable_k = True
    summary = "top-k among the experts and null ones that compute nothing or pass the token on (AdaMoE; LongCat-Flash)"

    def experts_computed_per_token(self, num_experts: int) -> float:
        """The target, or without one the share of real experts under balance over all E + Z choices."""
        target = self.target_experts_per_token
        if target is not None:
            return float(target)
        return self.top_k * num_experts / (num_experts + self.num_null_experts)

    def check(self, num_experts: int) -> None:
        if self.num_null_experts < 1:
            raise ValueError(f"model.moe.router.num_null_experts={self.num_null_experts} must be at least 1")
        if not 1 <= self.top_k <= num_experts + self.num_null_experts:
            raise ValueError(
                f"model.moe.router.top_k={self.top_k} must be in 1..num_experts + num_null_experts "
                f"({num_experts + self.num_null_experts})"
            )
        if self.null_kind not in ("zero", "identity"):
            raise ValueError(f"model.moe.router.null_kind={self.null_kind!r}; choose zero or identity")
        target = self.target_experts_per_token
        if target is not None and not 0 < target <= min(self.top_k, num_experts):
            raise ValueError(
                f"model.moe.router.target_experts_per_token={target} must be in (0, top_k] ({self.top_k}) and at "
                f"most num_experts ({num_experts})"
            )


@dataclass
class ReLURouterConfig(RouterConfig):
    name: str = "relu"
    # The average number of experts per token the L1 penalty steers to: target sparsity 1 - top_k / E (ReMoE).
    top_k: int = 2
    # The L1 penalty's starting coefficient and the factor it is multiplied by (too few gates at zero) or divided
    # by (too many) after every optimizer step (ReMoE: 1e-8 and 1.2). ReMoE shares one coefficient over the
    # layers; here each layer has its own, steered by its own sparsity.
    l1_coefficient: float = 1e-8
    l1_multiplier: float = 1.2
    variable_k = True
    uses_capacity = False  # dropless: the penalty, not a capacity, bounds the compute
    own_losses = ("relu_l1",)
    brings_aux_loss = "none"  # its own load-balanced L1 penalty balances the experts
    summary = "ReLU gates, as many experts as are positive, an adaptive L1 penalty holds the average (ReMoE 2025)"

    def experts_per_token(self, num_experts: int) -> int:
        return num_experts  # a slot per expert: those whose gate is zero go to no expert

    def experts_computed_per_token(self, num_experts: int) -> float:
        return float(self.top_k)

    def check(self, num_experts: int) -> None:
        super().check(num_experts)
        if self.l1_coefficient <= 0 or self.l1_multiplier <= 1:
            raise ValueError(
                f"router=relu needs l1_coefficient > 0 and l1_multiplier > 1 (got {self.l1_coefficient}, "
                f"{self.l1_multiplier})"
            )


@dataclass
class SoftRouterConfig(RouterConfig):
    name: str = "soft"
    top_k: int = 0  # ignored: every expert is used
    uses_capacity = False
    summary = "every expert on every token, mixed by a softmax gate (Jacobs, Jordan, Nowlan & Hinton 1991)"

    def check(self, num_experts: int) -> None:
        if self.top_k not in (0, num_experts):  # a setting this router would ignore is an error, never a no-op
            raise ValueError(
                f"router=soft sends every token to all {num_experts} experts; "
                f"model.moe.router.top_k={self.top_k} would be ignored: drop it (or use router=topk)"
            )

    def experts_per_token(self, num_experts: int) -> int:
        return num_experts

    def softmax_topk(self, num_experts: int) -> Optional[tuple[int, bool]]:
        return num_experts, True  # all experts; the weights already sum to one


@dataclass
class HierarchicalRouterConfig(RouterConfig):
    name: str = "hierarchical"
    # Experts per token inside each chosen group (top_k) times chosen groups (group_top_k) = experts per token.
    top_k: int = 1
    num_groups: int = 2
    group_top_k: int = 1
    # Renormalise the chosen joint weights p(group) * p(expert | group) to sum to 1.
    normalize: bool = True
    summary = "a gate over groups of experts, then one within each (Jordan & Jacobs 1994)"

    def check(self, num_experts: int) -> None:
        if self.num_groups < 2 or num_experts % self.num_groups:
            raise ValueError(
                f"model.moe.router.num_groups={self.num_groups} must be at least 2 and divide "
                f"num_experts ({num_experts})"
            )
        if not 1 <= self.group_top_k <= self.num_groups:
            raise ValueError(
                f"model.moe.router.group_top_k={self.group_top_k} must be in 1..num_groups ({self.num_groups})"
            )
        if not 1 <= self.top_k <= num_experts // self.num_groups:
            raise ValueError(
                f"model.moe.router.top_k={self.top_k} must be in 1..experts per group "
                f"({num_experts // self.num_groups})"
            )

    def experts_per_token(self, num_experts: int) -> int:
        return self.top_k * self.group_top_k


# ------------------------------------------------------------------------------------------------------------
# Finding routers


_plugins_loaded = False


class RouterPluginError(ImportError):
    """A `moe_lab.routers` entry point whose module fails to import."""


def load_router_plugins() -> None:
    """Import the modules named by `moe_lab.routers` entry points (once): their classes register themselves."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            importlib.import_module(point.value.partition(":")[0])
        except Exception as e:
            raise RouterPluginError(
                f"the router plugin {point.name!r} ({point.value}, a {PLUGIN_GROUP} entry point) could not be "
                f"imported: {type(e).__name__}: {e}; fix it or uninstall its package"
            ) from None
    _plugins_loaded = True


def registered_routers() -> dict[str, type[RouterConfig]]:
    """Every router's settings by name, plugins included."""
    load_router_plugins()
    return ROUTER_CONFIGS


def routers_where(flag: str, value: bool = True) -> list[str]:
    """The names of the routers whose capability `flag` is `value`, e.g. routers_where("has_gate", False)."""
    return sorted(name for name, cls in registered_routers().items() if getattr(cls, flag) is value)


def router_config(node: RouterConfig | Mapping[str, Any]) -> RouterConfig:
    """The Config of the router that `node` names, filled with that router's defaults.

    `node` is a RouterConfig (the base class holds only the shared keys) or its plain-dict form, as checkpoints store
    it. Raises ValueError naming an unknown router or a key that router does not have.
    """
    values = dataclasses.asdict(node) if dataclasses.is_dataclass(node) else dict(node)
    name = values.get("name", "topk")
    known = registered_routers()
    if name not in known:
        raise ValueError(
            f"model.moe.router.name={name!r} is not a router; the routers are {sorted(known)} (router=NAME picks one)"
        )
    cls = known[name]
    if type(node) is cls:
        return node
    keys = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ValueError(f"model.moe.router.{unknown[0]} is not a setting of router={name}; its settings are {keys}")
    return cls(**values)
