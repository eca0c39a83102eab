"""DeepSeek-V3 (DeepSeek-AI 2024): multi-head latent attention (model.kv_lora_rank, q_lora_rank, rope_dims,
v_head_size) with DeepSeek's interleaved RoPE pairs, sigmoid routing with an expert-choosing bias (router=aux_free),
group-limited top-k (n_group, topk_group), the routed scaling factor, ungated shared experts and dense first layers
(first_k_dense_replace). Its multi-token prediction module is not in transformers' model (its weights are dropped on
load), so an import carries none.

DeepSeek-V2 is known and refused: its router is a softmax with group-limited greedy selection and its own balance
losses. Kimi K2's folders say model_type `kimi_k2` and name their own code: refused like any other family's, with the
code never run."""

from __future__ import annotations

from typing import Any, Optional

from moe_lab.interop.families.family import (
    Family,
    Refusals,
    first_dense_then_moe,
    setting,
    sigmoid_moe_lacks,
    sigmoid_moe_layout,
    sigmoid_moe_settings,
)


class DeepSeekV3(Family):
    model_type = "deepseek_v3"
    title = "DeepSeek-V3"
    order = 50
    config_class = "DeepseekV3Config"
    routing = "sigmoid"
    router_bias = "mlp.gate.e_score_correction_bias"
    shared_expert = "mlp.shared_experts."
    shared_expert_gate = None
    mtp_modules = True

    def settings(self, hf: Any) -> dict[str, Any]:
        rope, nope = setting(hf, "qk_rope_head_dim"), setting(hf, "qk_nope_head_dim")
        return {
            "qkv_bias": False,
            "qk_norm": None,
            "n_kv_heads": None,
            "head_size": nope + rope,
            "rope_dims": rope,
            "kv_lora_rank": setting(hf, "kv_lora_rank"),
            "q_lora_rank": setting(hf, "q_lora_rank"),
            "v_head_size": setting(hf, "v_head_dim"),
        }

    def moe_settings(self, hf: Any) -> dict[str, Any]:
        return sigmoid_moe_settings(hf)

    def moe_layers(self, hf: Any) -> list[int]:
        return first_dense_then_moe(hf)

    def interleaved_rope(self, hf: Any) -> bool:
        return bool(setting(hf, "rope_interleave", True))

    def refusals(self, hf: Any) -> Refusals:
        rope = setting(hf, "rope_parameters") or {}
        yield (
            isinstance(rope, dict) and rope.get("rope_type", "default") != "default",
            f"scaled RoPE in latent attention (rope_type={rope.get('rope_type')}, which also rescales its softmax)",
        )
        heads, kv_heads = setting(hf, "num_attention_heads"), setting(hf, "num_key_value_heads")
        yield (
            kv_heads not in (None, heads),
            f"num_key_value_heads={kv_heads} unlike num_attention_heads={heads} (latent attention gives every head "
            "its keys and values)",
        )

    def holds_attention(self, cfg: Any) -> bool:
        return cfg.kv_lora_rank is not None

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        lacks = sigmoid_moe_lacks(cfg)
        return None if lacks is None else f"DeepSeek-V3 has no {lacks}"

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        return {
            **sigmoid_moe_layout(cfg, routing),
            "head_dim": cfg.rotary_dims,  # transformers' DeepSeek-V3 sizes its RoPE table by head_dim
            "kv_lora_rank": cfg.kv_lora_rank,
            "q_lora_rank": cfg.q_lora_rank,
            "qk_rope_head_dim": cfg.rotary_dims,
            "qk_nope_head_dim": cfg.head_dim - cfg.rotary_dims,
            "v_head_dim": cfg.v_head_dim,
            "rope_interleave": True,
            "attention_bias": False,
        }


class DeepSeekV2(Family):
    model_type = "deepseek_v2"
    title = "DeepSeek-V2"
    order = 201
    unsupported = (
        "its router is a softmax with group-limited greedy selection and DeepSeek-V2's own balance losses, which "
        "moe-lab does not have; DeepSeek-V3 (model_type deepseek_v3) is read"
    )
