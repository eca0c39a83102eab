"""What a Hugging Face model family is to moe-lab: a subclass of `Family` per `model_type`, registered by being
defined (its module lives in this package)."""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Optional

# Every family by model_type; filled by subclassing Family.
FAMILIES: dict[str, "Family"] = {}

# (whether the part is present, what it is) pairs: a present one is refused with its name.
Refusals = Iterable[tuple[bool, str]]


def setting(hf: Any, name: str, default: Any = None) -> Any:
    """A transformers config's value, or `default` where the family's config class lacks it."""
    return getattr(hf, name, default)


class Family:
    """One Hugging Face model family. The shared import and export code (`moe_lab/interop/huggingface.py`) maps what
    every family spells alike (widths, heads, positions, norms, embeddings, softmax top-k routing, the fused experts'
    weights) and asks the family for the rest through the methods below."""

    model_type: ClassVar[str] = ""  # config.json's model_type
    title: ClassVar[str] = ""  # the name people write, e.g. "Qwen2-MoE"
    order: ClassVar[int] = 100  # listing order; export tries the families whose attention fits in this order
    moe: ClassVar[bool] = True  # an MoE (imported and exported) or a dense model (read for upcycling)
    config_class: ClassVar[str] = ""  # the transformers config class export writes
    qk_norm: ClassVar[Optional[str]] = None  # its attention's q/k norm, as model.qk_norm says it
    # Its settings() read the config's attention_bias (biases on q, k and v: GLM-4.5; and on the output: gpt-oss);
    # elsewhere it is an output-projection bias beside q/k/v ones of its own, which moe-lab refuses.
    reads_attention_bias: ClassVar[bool] = False
    # How its router scores experts: "softmax" (top-k of a softmax: RouterConfig.softmax_topk) or "sigmoid" (DeepSeek-
    # V3's biased, group-limited sigmoid top-k: RouterConfig.sigmoid_topk).
    routing: ClassVar[str] = "softmax"
    unsupported: ClassVar[Optional[str]] = None  # a family moe-lab knows but cannot read yet: why (one clause)
    # Where the family keeps a layer's FFN weights, under model.layers.{i}.: the router's gate, the experts packed
    # as transformers 5 loads them ((E, 2F, D) gate then up rows; (E, D, F)), a shared expert and its gate, and a
    # dense layer's FFN (gate_proj, up_proj, down_proj under the prefix).
    router_gate: ClassVar[str] = "mlp.gate.weight"
    router_bias: ClassVar[Optional[str]] = None  # the sigmoid router's expert-choosing bias
    router_gate_bias: ClassVar[Optional[str]] = None  # a bias on the gate's logits (gpt-oss)
    experts_gate_up: ClassVar[str] = "mlp.experts.gate_up_proj"
    experts_down: ClassVar[str] = "mlp.experts.down_proj"
    experts_gate_up_bias: ClassVar[str] = "mlp.experts.gate_up_proj_bias"  # where experts have biases
    experts_down_bias: ClassVar[str] = "mlp.experts.down_proj_bias"
    attention_sinks: ClassVar[str] = "self_attn.sinks"  # where attention has sinks
    linear_attention: ClassVar[str] = "linear_attn."  # a Gated DeltaNet block's mixer (Qwen3-Next)
    # The experts' activations it has (model.moe.activation) and whether its experts have biases.
    activations: ClassVar[tuple[str, ...]] = ("swiglu", "geglu")
    # Its checkpoints keep multi-token prediction modules after the last layer, in DeepSeek-V3's layout (transformers'
    # model drops them; moe-lab reads them from the safetensors files and writes them into one of its own).
    mtp_modules: ClassVar[bool] = False
    expert_bias: ClassVar[bool] = False
    shared_expert: ClassVar[str] = "mlp.shared_expert."
    shared_expert_gate: ClassVar[Optional[str]] = "mlp.shared_expert_gate.weight"  # None: ungated (DeepSeekMoE)
    dense_ffn: ClassVar[str] = "mlp."

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.model_type:
            FAMILIES[cls.model_type] = cls()

    # -- into moe-lab --------------------------------------------------------------------------------------------

    def settings(self, hf: Any) -> dict[str, Any]:
        """The family's own model settings (beyond the shared backbone): q/k/v biases, q/k norm."""
        return {"qkv_bias": False, "qk_norm": self.qk_norm}

    def moe_settings(self, hf: Any) -> dict[str, Any]:
        """The family's own `model.moe` settings, over the shared ones (experts as wide as intermediate_size, no
        shared expert, weights renormalised as norm_topk_prob says)."""
        return {}

    def refusals(self, hf: Any) -> Refusals:
        """The parts of this family's config that moe-lab has no equivalent for (beyond the shared ones)."""
        return ()

    def moe_layers(self, hf: Any) -> list[int]:
        """Which layers are MoE: those not in mlp_only_layers whose (index + 1) is a multiple of decoder_sparse_step
        (Qwen's spelling; the families without these settings are MoE in every layer)."""
        step = setting(hf, "decoder_sparse_step", 1) or 1
        dense = set(setting(hf, "mlp_only_layers", None) or [])
        return [i for i in range(setting(hf, "num_hidden_layers")) if i not in dense and (i + 1) % step == 0]

    def experts_in(self, gate_up: Any, down: Any) -> tuple[Any, Any]:
        """The experts' packed weights as moe-lab holds them, (E, 2F, D) gate rows then up rows, and (E, D, F)."""
        return gate_up, down

    def experts_out(self, w_in: Any, w_out: Any) -> tuple[Any, Any]:
        """The inverse of experts_in."""
        return w_in, w_out

    def gate_up_bias_in(self, bias: Any) -> Any:
        """The experts' first bias as moe-lab holds it, (E, 2F): gate, then up."""
        return bias

    def gate_up_bias_out(self, bias: Any) -> Any:
        return bias

    def interleaved_rope(self, hf: Any) -> bool:
        """Whether the rotary dims of its q and k weights come in interleaved pairs (x0, x1), (x2, x3), ... rather than
        moe-lab's rotate-half halves; import reorders those rows (export orders them back)."""
        return False

    # -- out of moe-lab ------------------------------------------------------------------------------------------

    def holds_attention(self, cfg: Any) -> bool:
        """Whether a moe-lab model's attention is this family's: grouped-query with its q/k norm, every dim rotated
        (export tries the families whose attention the model has)."""
        return plain_attention(cfg) and cfg.qk_norm == self.qk_norm and cfg.rope_dims in (None, cfg.head_dim)

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        """Why this family cannot hold a moe-lab model whose attention it shares (one clause), or None if it can."""
        return None

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        """The family's own transformers config values for a moe-lab model (beyond the shared ones)."""
        return {}

    def attention_lacks(self, cfg: Any, what: str) -> str:
        """The reason a family with q/k norm cannot hold a model with its attention but with `what`."""
        return f"model.qk_norm={cfg.qk_norm} is {self.title} attention, and {self.title} has no {what}"


def experts_wide(hf: Any, name: str) -> dict[str, Any]:
    """`model.moe.expert_hidden` from the config value `name` (families spell the experts' width differently)."""
    return {"expert_hidden": setting(hf, name)}


def gated_shared_expert(hf: Any) -> dict[str, Any]:
    """Qwen's MoE block settings: experts of moe_intermediate_size, and one shared expert of its own width behind a
    sigmoid gate (Qwen2-MoE, Qwen3-Next), or none where its width is 0."""
    shared = setting(hf, "shared_expert_intermediate_size", 0) or 0
    return {
        **experts_wide(hf, "moe_intermediate_size"),
        "num_shared": 1 if shared else 0,
        "shared_hidden": shared or None,
        "shared_gate": bool(shared),
    }


def partial_rotary_factor(hf: Any) -> float:
    """The fraction of each head that RoPE rotates, from rope_parameters (1 where the config says nothing)."""
    rope = setting(hf, "rope_parameters") or {}
    return float(rope.get("partial_rotary_factor", 1.0)) if isinstance(rope, dict) else 1.0


def qwen_moe_layout(cfg: Any, routing: dict) -> dict[str, Any]:
    """The transformers values Qwen2-MoE and Qwen3-MoE spell alike: the dense FFN's and an expert's widths, the experts,
    the routing's renormalisation and the dense layers (mlp_only_layers, with every other layer MoE)."""
    return {
        "intermediate_size": cfg.ffn_hidden,
        "moe_intermediate_size": cfg.moe.expert_hidden,
        "num_experts": cfg.moe.num_experts,
        "norm_topk_prob": routing["norm_topk_prob"],
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layers(cfg),
        "use_sliding_window": False,
    }


def dense_layers(cfg: Any) -> list[int]:
    """The layers of a moe-lab model that are dense (Qwen's mlp_only_layers)."""
    return [layer for layer in range(cfg.n_layers) if not cfg.is_moe_layer(layer)]


# -- DeepSeek-V3's MoE block, which GLM-4.5 shares: sigmoid routing with a bias, groups, scaling, ungated shared
# experts of n_shared_experts x moe_intermediate_size, the first first_k_dense_replace layers dense.


def sigmoid_moe_settings(hf: Any) -> dict[str, Any]:
    """The `model.moe` settings of a DeepSeek-V3-style MoE block: the router is moe-lab's aux_free."""
    return {
        "expert_hidden": setting(hf, "moe_intermediate_size"),
        "num_shared": setting(hf, "n_shared_experts", 0) or 0,
        "router": {
            "name": "aux_free",
            "top_k": setting(hf, "num_experts_per_tok"),
            "normalize": bool(setting(hf, "norm_topk_prob", True)),
            "num_groups": setting(hf, "n_group") or 1,
            "topk_groups": setting(hf, "topk_group") or 1,
            "scaling_factor": float(setting(hf, "routed_scaling_factor", 1.0)),
        },
    }


def first_dense_then_moe(hf: Any) -> list[int]:
    """The MoE layers of a config whose first first_k_dense_replace layers are dense."""
    return list(range(setting(hf, "first_k_dense_replace", 0) or 0, setting(hf, "num_hidden_layers")))


def sigmoid_moe_lacks(cfg: Any) -> Optional[str]:
    """What a moe-lab model has that a DeepSeek-V3-style MoE block cannot hold, or None."""
    moe = cfg.moe
    first = cfg.moe_layers[0] if cfg.moe_layers else 0
    for present, what in (
        (cfg.moe_layers != list(range(first, cfg.n_layers)), "MoE layers but all after its first dense ones"),
        (moe.shared_gate, "gate on its shared experts"),
        (moe.shared_width % moe.expert_hidden, "shared experts whose width is not a multiple of an expert's"),
    ):
        if present:
            return what
    return None


def sigmoid_moe_layout(cfg: Any, routing: dict) -> dict[str, Any]:
    """The transformers values of a DeepSeek-V3-style MoE block for a moe-lab model."""
    moe = cfg.moe
    return {
        "intermediate_size": cfg.ffn_hidden,
        "moe_intermediate_size": moe.expert_hidden,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": moe.shared_width // moe.expert_hidden,
        "first_k_dense_replace": cfg.moe_layers[0],
        "num_mtp_layers": cfg.mtp_depth,
        **{k: v for k, v in routing.items() if k != "top_k"},
    }


def plain_attention(cfg: Any) -> bool:
    """Grouped-query attention in every block, without gpt-oss's parts (attention sinks, sliding windows, an output
    bias) or Qwen3-Next's (output gates, zero-centred norms, Gated DeltaNet blocks)."""
    others = cfg.attention_gate or cfg.norm_offset or cfg.linear_layers is not None
    gpt_oss = cfg.attention_sinks or cfg.sliding_window is not None or cfg.out_bias
    return cfg.kv_lora_rank is None and not others and not gpt_oss


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """transformers' rope_parameters for a moe-lab model: plain RoPE, or YaRN."""
    if cfg.rope_scaling_factor is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "rope_type": "yarn",
        "rope_theta": cfg.rope_theta,
        "factor": cfg.rope_scaling_factor,
        "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        "beta_fast": cfg.rope_beta_fast,
        "beta_slow": cfg.rope_beta_slow,
        "truncate": cfg.rope_truncate,
    }
