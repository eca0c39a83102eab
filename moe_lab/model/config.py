"""Configuration dataclasses of the MoE language model: the one place where the model's defaults live.

They are the schemas behind `conf/model/`, `conf/experts/`, `conf/capacity/`, `conf/aux_loss/` and (through each
router's own Config in `router_configs.py`) `conf/router/`; the YAML files there hold only what an option changes.
`check()` raises ValueError naming the offending `model.*` key, for the configuration check to report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from moe_lab.model.router_configs import RouterConfig, router_config

# What backward may recompute (moe_lab/model/checkpointing.py).
ACTIVATION_CHECKPOINTING = ("none", "moe", "block")

# The experts' activations by name: whether each is gated, act(x W_gate) * (x W_up) with the gate and up projections
# fused into one matrix (Shazeer 2020, "GLU Variants"). Their torch functions are experts.ACTIVATIONS.
# swiglu_clamped is gpt-oss's (experts.clamped_swiglu).
GATED_ACTIVATIONS = {"swiglu": True, "geglu": True, "gelu": False, "relu": False, "swiglu_clamped": True}


@dataclass
class AuxLossConfig:
    """Weights of the auxiliary router losses, added to the cross-entropy (0 = off).

    Each loss is computed per MoE layer and averaged over layers (never over concatenated layers: that hides
    per-layer imbalance, see transformers issue 31464). The formulas and papers are in `moe_lab/model/losses.py`.
    """

    # Switch/GShard load-balancing loss E * sum_i f_i * P_i over the micro-batch (Fedus et al. 2021). 1e-2 is the
    # value the Switch Transformer paper, Megatron-Core and OLMoE use.
    load_balance: float = 1e-2
    # The same loss within each sequence, averaged over sequences (DeepSeek-V2/V3).
    seq_load_balance: float = 0.0
    # The same loss with expert counts summed over all data-parallel ranks (Qiu et al. 2025, global-batch balance).
    global_load_balance: float = 0.0
    # Router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022, ST-MoE). Keeps router logits small; 1e-3 as ST-MoE.
    z_loss: float = 1e-3
    # Shazeer et al. 2017: CV^2 of the per-expert sum of gate weights ("importance"), and of the smooth expected
    # load of noisy top-k gating ("load"; needs router=noisy_topk). The paper used 0.1 for both.
    importance: float = 0.0
    load: float = 0.0

    def weights(self) -> dict[str, float]:
        return {
            "load_balance": self.load_balance,
            "seq_load_balance": self.seq_load_balance,
            "global_load_balance": self.global_load_balance,
            "z_loss": self.z_loss,
            "importance": self.importance,
            "load": self.load,
        }


@dataclass
class MoEConfig:
    """Mixture-of-Experts settings: which layers are MoE, the experts, the router, capacity and aux losses.

    Capacity, drops, the Switch loss and every per-batch statistic are defined per micro-batch of one rank (GShard's
    "group"), whatever the parallel layout: `expert_parallel` changes where experts live, never the math.
    """

    # false makes every FFN dense: the dense baseline (`experts=dense` or `model=dense_tiny`).
    enabled: bool = True
    # Routed experts per MoE layer (with layer_experts: the most any layer has).
    num_experts: int = 8
    # Routed experts of each MoE block, in order (the MoE layers', then the multi-token prediction blocks'), where
    # they differ: a model pruned to a total budget (`moe-lab prune --keep-total`). null = num_experts in every one.
    layer_experts: Optional[list[int]] = None
    # Hidden width of one expert's FFN. A top-k MoE with expert_hidden = ffn_hidden / k has the active parameters
    # of the dense model; fine-grained experts (DeepSeekMoE) split one FFN into many narrow ones. The default is
    # the full width of the default model's FFN (experts=e8: eight full-width experts).
    expert_hidden: int = 384
    # Shared experts that every token passes through (DeepSeekMoE, Qwen-MoE), each of width expert_hidden.
    num_shared: int = 0
    # A bias per expert on both of its projections (gpt-oss); none in the other families.
    expert_bias: bool = False
    # Latent experts (LatentMoE; Megatron-LM PR 2296): the routed experts work in a latent of this many dims, one
    # down-projection of the tokens before dispatch and one up-projection of the combined output after it (shared by
    # all experts), so that fine-grained experts and the all-to-all carry latent_dim numbers per row instead of
    # d_model. The router and the shared experts read the full width. null = experts on d_model.
    latent_dim: Optional[int] = None
    # Expert FFN: swiglu (Shazeer 2020, what Mixtral/DeepSeek/Qwen use), geglu, gelu or relu (non-gated).
    activation: str = "swiglu"
    # Token slots an expert may take from one micro-batch, as a multiple of its fair share:
    # capacity = ceil(cf * tokens * top_k / E). Overflowing slots are dropped (their FFN output is zero; the
    # residual carries them). null = dropless. 1.25 as the Switch Transformer.
    capacity_factor: Optional[float] = 1.25
    # Capacity factor in eval mode (validation). Switch and ST-MoE evaluate with a larger one (2.0). null = dropless.
    eval_capacity_factor: Optional[float] = 2.0
    # Which slots an over-full expert keeps: position (every token's first choice before any second choice, then
    # earlier tokens first: GShard) or probability (the highest router weights first: Megatron-Core's default).
    drop_policy: str = "position"
    # Capacity is at least this many slots per expert (DeepSpeed's min_capacity), so tiny batches do not drop.
    min_capacity: int = 0
    # Total hidden width of the shared experts; null = num_shared * expert_hidden. Qwen2-MoE's one shared expert is
    # wider than a routed one (5632 against 1408 in Qwen1.5-MoE-A2.7B).
    shared_hidden: Optional[int] = None
    # Gate the shared experts' output by sigmoid(x w) (Qwen2-MoE); false adds it as is (DeepSeekMoE).
    shared_gate: bool = False
    # Every n-th layer is MoE (1 = all; 2 = every other, as GShard/Switch); counted after the first dense layers.
    every_n_layers: int = 1
    # The first k layers stay dense (DeepSeek-V3 `first_k_dense_replace`): early layers route poorly.
    first_dense_layers: int = 0
    # The MoE layers as an explicit list of 0-based layer indices, for any pattern (Qwen's `mlp_only_layers`, a
    # study's own), e.g. [1, 2, 5]; null = the short form above (first_dense_layers, then every every_n_layers).
    layers: Optional[list[int]] = None
    # Expert parallelism: the experts of every MoE layer are split over this many ranks (an EP group), and token
    # slots travel to their experts' rank with all-to-all. 1 = every rank holds every expert. Must divide
    # num_experts and the world size; needs trainer=ddp. A layout, not a model setting: the math is the same at any
    # value and checkpoints load under any value.
    expert_parallel: int = 1
    # grouped: sort token slots by expert and run all experts as one grouped GEMM (torch._grouped_mm).
    # loop: a plain per-expert loop; slow, kept as the reference oracle for tests and benchmarks.
    implementation: str = "grouped"
    # The router: `name` selects a registered router class (moe_lab/model/routers.py), the other keys are that
    # class's Config. `router=NAME` on the command line picks a router with its settings.
    router: RouterConfig = field(default_factory=RouterConfig)
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)

    @property
    def shared_width(self) -> int:
        """Total hidden width of the shared experts (0: none)."""
        return (self.shared_hidden or self.num_shared * self.expert_hidden) if self.num_shared else 0


@dataclass
class ModelConfig:
    """Decoder-only transformer backbone (RMSNorm, RoPE, causal attention, SwiGLU FFN) with MoE FFNs.

    The defaults are the `tiny` preset: about 5M parameters (1.5M active per token), which trains in minutes on two
    CPU cores.
    """

    # Preset name, recorded for run names and dashboards.
    name: str = "tiny"
    # Vocabulary size; null = the tokenizer's, rounded up to a multiple of 64 (faster matmuls, as nanoGPT).
    vocab_size: Optional[int] = None
    # Residual stream width.
    d_model: int = 128
    # Transformer blocks.
    n_layers: int = 4
    # Attention heads; head dim = d_model / n_heads.
    n_heads: int = 4
    # Key/value heads for grouped-query attention (Ainslie et al. 2023); null = n_heads (multi-head attention).
    n_kv_heads: Optional[int] = None
    # Width of one attention head; null = d_model / n_heads. Qwen3-MoE sets it apart (128 with d_model 2048, 32 heads).
    head_size: Optional[int] = None
    # Biases on the query, key and value projections (Qwen2-MoE); none elsewhere.
    qkv_bias: bool = False
    # RMSNorm on queries and keys before RoPE: null (none: Llama, Mixtral), "head" (over each head's dims: Qwen3-MoE)
    # or "full" (over all heads' dims of the projection: OLMoE). It keeps attention logits from growing (Dehghani
    # et al. 2023; OLMoE section 4.1).
    qk_norm: Optional[str] = None
    # Dims of each query/key head that RoPE rotates; null = all. Grouped-query attention rotates the first ones and
    # passes the rest (partial rotary: GLM-4.5 and Qwen3-Next rotate half); latent attention rotates its decoupled
    # last ones (DeepSeek-V3's qk_rope_head_dim, 64 of its 192).
    rope_dims: Optional[int] = None
    # Multi-head latent attention (DeepSeek-V2, Liu et al. 2024): every head's keys and values come from one latent
    # of kv_lora_rank dims per token, the cache an inference engine keeps (DeepSeek-V3: 512); null = grouped-query
    # attention. Latent attention has no q/k/v biases or q/k norms (its latents are normed) and n_kv_heads = n_heads.
    kv_lora_rank: Optional[int] = None
    # Latent attention's query latent (DeepSeek-V3: 1536); null = a full-rank query projection (DeepSeek-V2-Lite).
    q_lora_rank: Optional[int] = None
    # Width of one value head, latent attention only; null = head_size. DeepSeek-V3: 128 against 192 for q and k.
    v_head_size: Optional[int] = None
    # A bias on the attention's output projection (gpt-oss, with qkv_bias); none elsewhere.
    out_bias: bool = False
    # A learned logit per head that joins every query's softmax and takes attention mass without giving a value
    # (gpt-oss; learned attention sinks, after Xiao et al. 2024), so that a head can attend to nothing.
    attention_sinks: bool = False
    # Sliding-window attention: a query sees the last sliding_window positions (itself included), in the layers of
    # sliding_layers (null: every layer), e.g. [0, 2] for gpt-oss's alternation over 4 layers; null = full attention.
    sliding_window: Optional[int] = None
    sliding_layers: Optional[list[int]] = None
    # YaRN context extension of RoPE (Peng et al. 2023): frequencies interpolated by this factor where their
    # wavelength exceeds the pre-training context (rope_original_max_seq_len), kept where it is short (the ramp
    # between beta_fast and beta_slow rotations), cos and sin scaled by 0.1 ln(factor) + 1. null = plain RoPE.
    # gpt-oss: factor 32 over 4096 positions, betas 32 and 1, no truncation of the ramp's ends.
    rope_scaling_factor: Optional[float] = None
    rope_original_max_seq_len: Optional[int] = None
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    # A sigmoid gate on each attention head's output, from a second half of the query projection (Qwen3-Next's gated
    # attention: each head [query | gate]).
    attention_gate: bool = False
    # Gated DeltaNet (Yang et al. 2025) instead of attention in these blocks (Qwen3-Next: three of every four, e.g.
    # [0, 1, 2] of 4); null = attention in every block. Its heads: key heads and their width, value heads (a multiple
    # of the key heads) and their width, and the causal convolution's kernel.
    linear_layers: Optional[list[int]] = None
    deltanet_key_heads: int = 2
    deltanet_key_dim: int = 32
    deltanet_value_heads: int = 4
    deltanet_value_dim: int = 32
    deltanet_conv: int = 4
    # RMSNorm weights stored as an offset from 1 and initialised at 0 (Qwen3-Next), so that weight decay pulls them
    # to 1 rather than 0; the function is the same.
    norm_offset: bool = False
    # Hidden width of the dense SwiGLU FFN (dense layers and the dense baseline): 3 x d_model, a multiple of 64.
    ffn_hidden: int = 384
    # Longest sequence the model accepts; sets the RoPE table size.
    max_seq_len: int = 512
    # RoPE base frequency (Su et al. 2021); 10000 as in the original paper and Llama-2.
    rope_theta: float = 10000.0
    # RMSNorm epsilon (Zhang & Sennrich 2019).
    norm_eps: float = 1e-5
    # Std of the normal init of every weight matrix; residual output projections are scaled by 1/sqrt(2 n_layers)
    # as in GPT-2, so the residual stream's variance does not grow with depth.
    init_std: float = 0.02
    # Share the token embedding with the output head (GPT-2 does; Mixtral and Qwen-MoE do not).
    tie_embeddings: bool = False
    # Multi-token prediction (DeepSeek-V3 section 2.2): D sequential modules, the k-th predicting the token k + 1
    # ahead through one more block; their mean cross-entropy, times mtp_loss_weight, joins the training loss
    # (DeepSeek-V3: D = 1, weight 0.3 for its first 10T tokens, then 0.1). Generation ignores them. 0 = none.
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # What backward recomputes instead of keeping (moe_lab/model/checkpointing.py): none; moe, each MoE layer (its
    # k rows per token); block, each whole block. Less activation memory for one more forward of that part; the
    # routing of a recompute is the forward's (replayed), so the gradients are those without it.
    activation_checkpointing: str = "none"
    moe: MoEConfig = field(default_factory=MoEConfig)
    # A model to start from (a moe-lab checkpoint, or a Hugging Face directory or hub id): alone, a warm start with
    # its settings and weights; with `upcycle=copy|granular|drop` a dense model whose backbone replaces the backbone
    # settings above and whose FFNs become the experts (moe_lab/model/upcycled_weights.py). null = train from scratch.
    init_from: Optional[str] = None

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_head_size or self.head_dim

    @property
    def rotary_dims(self) -> int:
        return self.rope_dims or self.head_dim

    def is_linear_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) mixes tokens by Gated DeltaNet rather than attention."""
        return self.linear_layers is not None and layer in self.linear_layers

    def deltanet_params(self) -> int:
        """Parameters of one Gated DeltaNet block's token mixer and its input norm."""
        d, Kd = self.d_model, self.deltanet_key_heads * self.deltanet_key_dim
        Hv, Vd = self.deltanet_value_heads, self.deltanet_value_heads * self.deltanet_value_dim
        conv = (2 * Kd + Vd) * self.deltanet_conv
        return d * (2 * Kd + 2 * Vd) + d * 2 * Hv + conv + 2 * Hv + self.deltanet_value_dim + Vd * d + d

    def is_sliding_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) attends over a sliding window."""
        if self.sliding_window is None:
            return False
        return self.sliding_layers is None or layer in self.sliding_layers

    def attention_params(self) -> int:
        """Parameters of one block's attention and its input norm."""
        d, heads, head_dim, kv = self.d_model, self.n_heads, self.head_dim, self.kv_heads
        if self.kv_lora_rank is not None:
            rank, rope = self.kv_lora_rank, self.rotary_dims
            q = d * heads * head_dim if self.q_lora_rank is None else self.q_lora_rank * (d + 1 + heads * head_dim)
            kv_part = d * (rank + rope) + rank + rank * heads * (head_dim - rope + self.v_head_dim)
            return q + kv_part + heads * self.v_head_dim * d + d
        q = heads * head_dim * (2 if self.attention_gate else 1)
        attention = d * q + d * 2 * kv * head_dim + heads * head_dim * d + d
        attention += (d if self.out_bias else 0) + (heads if self.attention_sinks else 0)
        if self.qkv_bias:
            attention += q + 2 * kv * head_dim
        if self.qk_norm == "head":
            attention += 2 * head_dim
        elif self.qk_norm == "full":
            attention += (heads + kv) * head_dim
        return attention

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has an MoE FFN."""
        if not self.moe.enabled:
            return False
        if self.moe.layers is not None:
            return layer in self.moe.layers
        if layer < self.moe.first_dense_layers:
            return False
        return (layer - self.moe.first_dense_layers) % self.moe.every_n_layers == 0

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layers) if self.is_moe_layer(layer)]

    @property
    def routed_layers(self) -> list[int]:
        """The numbers of every MoE block the model builds: `moe_layers`, then the multi-token prediction modules'
        (numbered n_layers + depth - 1; MoE when the last block is), as MoETransformer.moe_layers gives them."""
        mtp = range(self.n_layers, self.n_layers + self.mtp_depth) if self.is_moe_layer(self.n_layers - 1) else []
        return self.moe_layers + list(mtp)

    def experts_in(self, layer: int) -> int:
        """The routed experts of MoE block `layer` (a number from `routed_layers`)."""
        if self.moe.layer_experts is None:
            return self.moe.num_experts
        return self.moe.layer_experts[self.routed_layers.index(layer)]

    def moe_of(self, layer: int) -> MoEConfig:
        """The MoE settings of block `layer`: the model's, with that block's number of experts."""
        if self.moe.layer_experts is None:
            return self.moe
        return dataclasses.replace(self.moe, num_experts=self.experts_in(layer), layer_experts=None)

    def size_estimate(self) -> tuple[int, int]:
        """(parameters, buffer elements) of the model these settings build, from the settings alone: what lets a
        command refuse a model that cannot fit in memory before it builds one (an absurd `num_hidden_layers` would
        otherwise hang while a million blocks are made). The parameters are exactly `MoETransformer.num_params()
        ["total"]` for routers whose only weight is the gate (topk, switch, sinkhorn, soft, ...); noisy top-k's noise
        weights and hierarchical gating's group gate add a little, routers without a gate (hash, domain oracle) have
        one row per expert less. An unset vocab_size counts as 0."""
        d = self.d_model
        vocab = self.vocab_size or 0
        attention = self.attention_params() + d  # + the FFN's norm
        linear = len([i for i in range(self.n_layers) if self.is_linear_layer(i)])
        moe = self.moe
        gated = 3 if GATED_ACTIVATIONS.get(moe.activation) else 2
        dense_ffn = 3 * d * self.ffn_hidden
        width = moe.latent_dim or d  # the experts' input and output width

        def moe_ffn(E: int) -> int:
            """An MoE FFN of E routed experts."""
            params = E * (gated * width * moe.expert_hidden + d)  # experts and the gate's rows
            params += 2 * d * width if moe.latent_dim else 0  # the latent down- and up-projections
            params += E if getattr(moe.router, "gate_bias", False) else 0  # a bias on the gate's logits
            if moe.expert_bias:
                params += E * ((gated - 1) * moe.expert_hidden + width)  # (gated - 1) F in, width out
            if moe.num_shared:
                params += gated * d * moe.shared_width + (d if moe.shared_gate else 0)
            return params

        moe_layers = len(self.moe_layers)
        dense_mtp = 0 if self.is_moe_layer(self.n_layers - 1) else self.mtp_depth * dense_ffn
        mtp = self.mtp_depth * (attention + 2 * d * d + 3 * d) + dense_mtp  # block, projection and three norms
        params = mtp + (
            vocab * d * (1 if self.tie_embeddings else 2)
            + d
            + (self.n_layers - linear) * attention
            + linear * (self.deltanet_params() + d)
            + sum(moe_ffn(self.experts_in(layer)) for layer in self.routed_layers)
            + (self.n_layers - moe_layers) * dense_ffn
        )
        rope_tables = 2 * self.max_seq_len * self.rotary_dims
        return params, rope_tables

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """The model config from its plain-dict form (what a checkpoint stores); ValueError names an unknown key."""
        values = dict(values)
        moe = dict(values.pop("moe", None) or {})
        router = router_config(moe.pop("router", None) or RouterConfig())
        aux = _build(AuxLossConfig, moe.pop("aux_loss", None) or {}, "model.moe.aux_loss")
        return _build(
            cls, {**values, "moe": _build(MoEConfig, {**moe, "router": router, "aux_loss": aux}, "model.moe")}, "model"
        )

    def check(self) -> None:
        """Raise ValueError naming the first setting this model cannot be built with."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        for key in ("d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            need(getattr(self, key) >= 1, f"model.{key}={getattr(self, key)} must be at least 1")
        need(
            self.head_size is not None or self.d_model % self.n_heads == 0,
            f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads} (or set model.head_size)",
        )
        need(self.head_size is None or self.head_size >= 2, f"model.head_size={self.head_size} must be at least 2")
        for key in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, key)
            need(value == value and 0 < value < float("inf"), f"model.{key}={value} must be a positive number")
        need(self.qk_norm in (None, "head", "full"), f"model.qk_norm={self.qk_norm!r}; choose null, head or full")
        need(
            self.head_dim % 2 == 0,
            f"model.d_model={self.d_model} / model.n_heads={self.n_heads} gives head dim "
            f"{self.head_dim}; rotary embeddings need an even head dim",
        )
        need(
            self.n_kv_heads is None or (self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0),
            f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}",
        )
        need(
            self.vocab_size is None or self.vocab_size >= 1,
            f"model.vocab_size={self.vocab_size} must be at least 1 (or null for the tokenizer's)",
        )
        self._check_attention(need)
        need(self.mtp_depth >= 0, f"model.mtp_depth={self.mtp_depth} must be >= 0 (0: no multi-token prediction)")
        need(self.mtp_loss_weight >= 0, f"model.mtp_loss_weight={self.mtp_loss_weight} must be >= 0")
        need(
            self.activation_checkpointing in ACTIVATION_CHECKPOINTING,
            f"model.activation_checkpointing={self.activation_checkpointing!r} is not one of "
            f"{', '.join(ACTIVATION_CHECKPOINTING)} (what backward recomputes: nothing, each MoE layer, each block)",
        )
        self._check_moe(need)

    def _check_attention(self, need: Callable[[bool, str], None]) -> None:
        """Partial rotary, YaRN, sliding windows and latent attention."""
        linear = self.linear_layers
        need(
            linear is None or (self.kv_lora_rank is None and all(0 <= i < self.n_layers for i in linear)),
            f"model.linear_layers={linear} must be layers 0..{self.n_layers - 1} of a grouped-query attention model",
        )
        need(
            self.deltanet_value_heads % max(self.deltanet_key_heads, 1) == 0 and self.deltanet_key_heads >= 1,
            f"model.deltanet_value_heads={self.deltanet_value_heads} must be a multiple of "
            f"model.deltanet_key_heads={self.deltanet_key_heads}",
        )
        window, layers = self.sliding_window, self.sliding_layers
        need(window is None or window >= 1, f"model.sliding_window={window} must be at least 1 (or null)")
        need(
            layers is None or (window is not None and all(0 <= i < self.n_layers for i in layers)),
            f"model.sliding_layers={layers} must be layers 0..{self.n_layers - 1} of a model with a sliding_window",
        )
        factor, original = self.rope_scaling_factor, self.rope_original_max_seq_len
        need(
            factor is None or (factor >= 1 and original is not None and original >= 1),
            f"model.rope_scaling_factor={factor} (YaRN) must be at least 1, with model.rope_original_max_seq_len "
            f"(the pre-training context; got {original})",
        )
        rope = self.rope_dims
        need(
            rope is None or (2 <= rope <= self.head_dim and rope % 2 == 0),
            f"model.rope_dims={rope} must be an even number in 2..head size ({self.head_dim}), or null for all",
        )
        if self.kv_lora_rank is None:
            for key in ("q_lora_rank", "v_head_size"):
                need(
                    getattr(self, key) is None,
                    f"model.{key} is a setting of latent attention; set model.kv_lora_rank too (or drop it)",
                )
            return
        for key in ("kv_lora_rank", "q_lora_rank", "v_head_size"):
            value = getattr(self, key)
            need(value is None or value >= 1, f"model.{key}={value} must be at least 1")
        need(
            not (self.out_bias or self.attention_sinks or self.sliding_window),
            "latent attention (model.kv_lora_rank) has no output bias, attention sinks or sliding window here",
        )
        need(
            self.kv_heads == self.n_heads,
            f"model.n_kv_heads={self.n_kv_heads}: latent attention gives every head its own keys and values; "
            "set it to null",
        )
        need(
            not self.qkv_bias and self.qk_norm is None,
            "latent attention (model.kv_lora_rank) has no q/k/v biases or q/k norm: set model.qkv_bias=false and "
            "model.qk_norm=null",
        )

    def _check_layer_experts(self, need: Callable[[bool, str], None]) -> None:
        """One count per MoE block, the largest num_experts, each one the router (and expert parallelism) takes."""
        counts, blocks = self.moe.layer_experts or [], self.routed_layers
        need(
            len(counts) == len(blocks) and all(isinstance(n, int) and n >= 1 for n in counts),
            f"model.moe.layer_experts={counts} must give a number of experts (>= 1) for each of the "
            f"{len(blocks)} MoE blocks {blocks}",
        )
        need(
            max(counts) == self.moe.num_experts,
            f"model.moe.num_experts={self.moe.num_experts} must be the largest of model.moe.layer_experts={counts}",
        )
        for layer, count in zip(blocks, counts):
            try:
                router_config(self.moe.router).check(count)
            except ValueError as e:
                need(False, f"model.moe.layer_experts: block {layer}'s {count} experts: {e}")
            need(
                count % self.moe.expert_parallel == 0,
                f"model.moe.expert_parallel={self.moe.expert_parallel} must divide every layer's number of experts "
                f"(model.moe.layer_experts={counts})",
            )

    def _check_moe(self, need: Callable[[bool, str], None]) -> None:
        """Experts, router, capacity and shared experts."""
        moe = self.moe
        need(
            moe.num_experts >= 1,
            f"model.moe.num_experts={moe.num_experts} must be at least 1 "
            "(for a dense model use experts=dense or model=dense_tiny)",
        )
        router_config(moe.router).check(moe.num_experts)
        if moe.layer_experts is not None:
            self._check_layer_experts(need)
        need(
            moe.drop_policy in ("position", "probability"),
            f"model.moe.drop_policy={moe.drop_policy!r}; choose position or probability",
        )
        need(moe.min_capacity >= 0, f"model.moe.min_capacity={moe.min_capacity} must be >= 0")
        need(
            not moe.shared_gate or moe.num_shared > 0,
            "model.moe.shared_gate=true gates the shared experts, but model.moe.num_shared is 0",
        )
        for key in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(moe, key)
            need(
                value is None or (value == value and abs(value) != float("inf") and value > 0),
                f"model.moe.{key}={value} must be > 0 (or null for dropless routing)",
            )
        self._check_moe_layout(need)

    def _check_moe_layout(self, need: Callable[[bool, str], None]) -> None:
        """Widths, activation, the MoE layers and expert parallelism."""
        moe = self.moe
        need(moe.expert_hidden >= 1, f"model.moe.expert_hidden={moe.expert_hidden} must be at least 1")
        # torch._grouped_mm needs 16-byte-aligned row strides: multiples of 8 elements cover bf16 and float32.
        need(moe.latent_dim is None or moe.latent_dim >= 1, f"model.moe.latent_dim={moe.latent_dim} must be >= 1")
        for key, value in (
            ("model.d_model", self.d_model),
            ("model.moe.expert_hidden", moe.expert_hidden),
            ("model.moe.latent_dim", moe.latent_dim or 8),
        ):
            need(
                not moe.enabled or value % 8 == 0,
                f"{key}={value} must be a multiple of 8 (the grouped GEMM needs 16-byte-aligned rows)",
            )
        need(moe.num_shared >= 0, f"model.moe.num_shared={moe.num_shared} must be >= 0")
        need(
            moe.shared_hidden is None or (moe.shared_hidden >= 1 and moe.num_shared >= 1),
            f"model.moe.shared_hidden={moe.shared_hidden} must be at least 1, with model.moe.num_shared >= 1",
        )
        need(
            moe.activation in GATED_ACTIVATIONS,
            f"model.moe.activation={moe.activation!r} is not known; choose one of {sorted(GATED_ACTIVATIONS)}",
        )
        need(moe.every_n_layers >= 1, f"model.moe.every_n_layers={moe.every_n_layers} must be at least 1")
        need(
            0 <= moe.first_dense_layers <= self.n_layers,
            f"model.moe.first_dense_layers={moe.first_dense_layers} must be in 0..n_layers ({self.n_layers})",
        )
        need(
            moe.implementation in ("grouped", "loop"),
            f"model.moe.implementation={moe.implementation!r}; choose grouped or loop",
        )
        if moe.layers is not None:
            need(
                moe.every_n_layers == 1 and moe.first_dense_layers == 0,
                f"model.moe.layers={moe.layers} lists the MoE layers itself: leave model.moe.every_n_layers and "
                "model.moe.first_dense_layers at their defaults (1, 0)",
            )
            need(
                all(isinstance(layer, int) and 0 <= layer < self.n_layers for layer in moe.layers)
                and len(set(moe.layers)) == len(moe.layers),
                f"model.moe.layers={moe.layers} must list distinct layers in 0..{self.n_layers - 1} (0-based, "
                f"model.n_layers={self.n_layers})",
            )
        need(
            not moe.enabled or bool(self.moe_layers),
            "no layer is MoE with these settings: lower model.moe.first_dense_layers, list model.moe.layers, or "
            "set experts=dense for a dense model",
        )
        need(moe.expert_parallel >= 1, f"model.moe.expert_parallel={moe.expert_parallel} must be at least 1")
        if moe.enabled and moe.expert_parallel > 1:
            need(
                moe.num_experts % moe.expert_parallel == 0,
                f"model.moe.expert_parallel={moe.expert_parallel} must divide model.moe.num_experts="
                f"{moe.num_experts}: every rank of an expert-parallel group holds the same number of experts",
            )
            need(
                moe.implementation == "grouped",
                "model.moe.implementation=loop is the single-device reference; "
                "expert parallelism runs the grouped path",
            )


def padded_vocab_size(tokenizer_size: int) -> int:
    """`vocab_size: null`: the tokenizer's size rounded up to a multiple of 64 (faster matmuls, as nanoGPT); the
    byte-level tokenizer's 257 becomes 320."""
    return -(-tokenizer_size // 64) * 64


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    keys = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - keys)
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]} is not a setting; the settings of {prefix} are {sorted(keys)}")
    return cls(**values)
