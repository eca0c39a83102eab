"""Configuration dataclasses for the MoE language model.

These are the schemas behind `conf/model/*.yaml`, `conf/experts/`, `conf/capacity/` and `conf/aux_loss/`.
The YAML files hold values; these classes hold types, defaults and the reasons for them. `conf/router/*.yaml`
is checked against the `Config` of the router class it names (see `moe_lab/model/routers.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


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
        return {"load_balance": self.load_balance, "seq_load_balance": self.seq_load_balance,
                "global_load_balance": self.global_load_balance, "z_loss": self.z_loss,
                "importance": self.importance, "load": self.load}


@dataclass
class MoEConfig:
    """Mixture-of-Experts settings: which layers are MoE, the experts, the router, capacity and aux losses."""

    # false makes every FFN dense: the dense baseline (`experts=dense` or `model=dense_tiny`).
    enabled: bool = True
    # Routed experts per MoE layer.
    num_experts: int = 8
    # Hidden width of one expert's FFN. A top-k MoE with expert_hidden = ffn_hidden / k has the active
    # parameters of the dense model; fine-grained experts (DeepSeekMoE) split one FFN into many narrow ones.
    expert_hidden: int = 256
    # Shared experts that every token passes through (DeepSeekMoE, Qwen-MoE), each of width expert_hidden.
    num_shared: int = 0
    # Expert FFN: swiglu (Shazeer 2020, what Mixtral/DeepSeek/Qwen use), geglu, gelu or relu (non-gated).
    activation: str = "swiglu"
    # Tokens an expert may take, as a multiple of its fair share: capacity = ceil(cf * tokens * top_k / E).
    # Overflowing token slots are dropped (their FFN output is zero; the residual carries them). null = dropless.
    capacity_factor: Optional[float] = 1.25
    # Capacity factor in eval mode (validation). Switch and ST-MoE evaluate with a larger one (2.0). null = dropless.
    eval_capacity_factor: Optional[float] = 2.0
    # Which slots an over-full expert keeps: position (every token's first choice before any second choice, then
    # earlier tokens first: GShard) or probability (the highest router weights first: Megatron-Core's default).
    drop_policy: str = "position"
    # Capacity is at least this many slots per expert (DeepSpeed's min_capacity), so tiny batches do not drop.
    min_capacity: int = 0
    # Gate the shared experts' output by sigmoid(x w) (Qwen2-MoE); false adds it as is (DeepSeekMoE).
    shared_gate: bool = False
    # Every n-th layer is MoE (1 = all; 2 = every other, as GShard/Switch); counted after the first dense layers.
    every_n_layers: int = 1
    # The first k layers stay dense (DeepSeek-V3 `first_k_dense_replace`): early layers route poorly.
    first_dense_layers: int = 0
    # Expert parallelism: the experts of every MoE layer are split over this many ranks (an EP group), and tokens
    # travel to their experts' rank with all-to-all. 1 = every rank holds every expert. Must divide num_experts and
    # the world size; needs trainer=ddp. A layout, not a model setting: checkpoints load under any value.
    expert_parallel: int = 1
    # grouped: sort tokens by expert and run all experts as one grouped GEMM (torch._grouped_mm).
    # loop: a plain per-expert loop; slow, kept as the reference oracle for tests and benchmarks.
    implementation: str = "grouped"
    # The router: a node whose `name` selects a registered class; its other keys are that class's Config.
    router: Any = field(default_factory=lambda: {"name": "topk", "top_k": 2, "normalize": True})
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)


@dataclass
class ModelConfig:
    """Decoder-only transformer backbone (RMSNorm, RoPE, causal attention, SwiGLU FFN) with MoE FFNs."""

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
    # Hidden width of the dense SwiGLU FFN (dense layers and the dense baseline).
    ffn_hidden: int = 512
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
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has an MoE FFN."""
        if not self.moe.enabled or layer < self.moe.first_dense_layers:
            return False
        return (layer - self.moe.first_dense_layers) % self.moe.every_n_layers == 0

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layers) if self.is_moe_layer(layer)]
