"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): softmax top-k with weights renormalised or not (norm_topk_prob), dense
layers (mlp_only_layers), a sigmoid-gated shared expert wider than a routed one, q/k/v biases. Export's choice for a
model without q/k norm that Mixtral cannot hold."""

from __future__ import annotations

from typing import Any, Optional

from moe_lab.interop.families.family import Family, gated_shared_expert, qwen_moe_layout, setting


class Qwen2MoE(Family):
    model_type = "qwen2_moe"
    title = "Qwen2-MoE"
    order = 20
    config_class = "Qwen2MoeConfig"

    def settings(self, hf: Any) -> dict[str, Any]:
        return {"qkv_bias": bool(setting(hf, "qkv_bias", True)), "qk_norm": None}

    def moe_settings(self, hf: Any) -> dict[str, Any]:
        return gated_shared_expert(hf)

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        if cfg.moe.num_shared and not cfg.moe.shared_gate:
            return (
                "shared experts without a gate (DeepSeekMoE) have no Hugging Face equivalent with this "
                "attention; Qwen2-MoE gates its shared expert: train with model.moe.shared_gate=true"
            )
        return None

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        return {
            **qwen_moe_layout(cfg, routing),
            "shared_expert_intermediate_size": cfg.moe.shared_width,
            "qkv_bias": cfg.qkv_bias,
        }
