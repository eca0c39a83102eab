"""OLMoE (Muennighoff et al. 2024): RMSNorm on queries and keys over the whole projection (model.qk_norm=full), every
layer MoE, no shared expert, no biases, heads of d_model / n_heads."""

from __future__ import annotations

from typing import Any, Optional

from moe_lab.interop.families.family import Family, Refusals, setting


class OLMoE(Family):
    model_type = "olmoe"
    title = "OLMoE"
    order = 40
    config_class = "OlmoeConfig"
    qk_norm = "full"

    def refusals(self, hf: Any) -> Refusals:
        d_model, heads = setting(hf, "hidden_size"), setting(hf, "num_attention_heads")
        head_dim = setting(hf, "head_dim") or d_model // heads
        yield (
            head_dim * heads != d_model,
            "a head_dim other than hidden_size / num_attention_heads (OLMoE's q/k norms span hidden_size)",
        )

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        for present, what in (
            (cfg.moe.num_shared, "shared experts"),
            (cfg.qkv_bias, "q/k/v biases"),
            (len(cfg.moe_layers) != cfg.n_layers, "dense layers"),
            (cfg.head_size not in (None, cfg.d_model // cfg.n_heads), "a head size other than d_model / n_heads"),
        ):
            if present:
                return self.attention_lacks(cfg, what)
        return None

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        moe = cfg.moe
        return {
            "intermediate_size": moe.expert_hidden,
            "num_experts": moe.num_experts,
            "norm_topk_prob": routing["norm_topk_prob"],
            "attention_bias": False,
            "clip_qkv": None,
        }
