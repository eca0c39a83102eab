"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): RMSNorm on queries and keys over each head (model.qk_norm=head), a head
width set apart from d_model / n_heads, dense layers (mlp_only_layers), no shared expert, no biases."""

from __future__ import annotations

from typing import Any, Optional

from moe_lab.interop.families.family import Family, experts_wide, qwen_moe_layout


class Qwen3MoE(Family):
    model_type = "qwen3_moe"
    title = "Qwen3-MoE"
    order = 30
    config_class = "Qwen3MoeConfig"
    qk_norm = "head"

    def moe_settings(self, hf: Any) -> dict[str, Any]:
        return experts_wide(hf, "moe_intermediate_size")

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        for present, what in ((cfg.moe.num_shared, "shared experts"), (cfg.qkv_bias, "q/k/v biases")):
            if present:
                return self.attention_lacks(cfg, what)
        return None

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        return {**qwen_moe_layout(cfg, routing), "attention_bias": False}
