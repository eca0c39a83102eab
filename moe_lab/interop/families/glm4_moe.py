"""GLM-4.5 and GLM-4.6 (Zhipu AI 2025): DeepSeek-V3's MoE block (the sigmoid router with its expert-choosing bias as
router=aux_free, groups, scaling, ungated shared experts, dense first layers) behind grouped-query attention with
biases on q, k and v (its attention_bias), optional per-head q/k RMSNorm (use_qk_norm) and partial rotary embeddings
(partial_rotary_factor: RoPE on the first half of each head by default). Its multi-token prediction layer is not in
transformers' model, so an import carries none."""

from __future__ import annotations

from typing import Any, Optional

from moe_lab.interop.families.family import (
    Family,
    first_dense_then_moe,
    partial_rotary_factor,
    plain_attention,
    rope_parameters,
    setting,
    sigmoid_moe_lacks,
    sigmoid_moe_layout,
    sigmoid_moe_settings,
)


class GLM45(Family):
    model_type = "glm4_moe"
    title = "GLM-4.5"
    order = 60
    config_class = "Glm4MoeConfig"
    routing = "sigmoid"
    router_bias = "mlp.gate.e_score_correction_bias"
    shared_expert = "mlp.shared_experts."
    shared_expert_gate = None
    reads_attention_bias = True
    mtp_modules = True

    def settings(self, hf: Any) -> dict[str, Any]:
        d_model, heads = setting(hf, "hidden_size"), setting(hf, "num_attention_heads")
        head_dim = setting(hf, "head_dim") or d_model // heads
        rope_dims = int(head_dim * partial_rotary_factor(hf))  # as transformers sizes GLM's RoPE table
        return {
            "qkv_bias": bool(setting(hf, "attention_bias", False)),
            "qk_norm": "head" if setting(hf, "use_qk_norm", False) else None,
            "rope_dims": rope_dims if rope_dims != head_dim else None,
        }

    def moe_settings(self, hf: Any) -> dict[str, Any]:
        return sigmoid_moe_settings(hf)

    def moe_layers(self, hf: Any) -> list[int]:
        return first_dense_then_moe(hf)

    def holds_attention(self, cfg: Any) -> bool:
        return plain_attention(cfg) and cfg.qk_norm in (None, "head")

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        lacks = sigmoid_moe_lacks(cfg)
        if lacks is None and int(cfg.head_dim * (cfg.rotary_dims / cfg.head_dim)) != cfg.rotary_dims:
            lacks = f"partial_rotary_factor that gives model.rope_dims={cfg.rope_dims} of {cfg.head_dim}"
        return None if lacks is None else f"GLM-4.5 has no {lacks}"

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        rope = rope_parameters(cfg)
        return {
            **sigmoid_moe_layout(cfg, routing),
            "attention_bias": cfg.qkv_bias,
            "use_qk_norm": cfg.qk_norm == "head",
            "rope_parameters": {**rope, "partial_rotary_factor": cfg.rotary_dims / cfg.head_dim},
        }
