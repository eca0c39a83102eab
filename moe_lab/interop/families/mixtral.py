"""Mixtral (Jiang et al. 2024): softmax top-k with the k weights renormalised to sum to 1, every layer MoE, no shared
expert, no biases, no q/k norm."""

from __future__ import annotations

from typing import Any, Optional

from moe_lab.interop.families.family import Family, Refusals, setting


class Mixtral(Family):
    model_type = "mixtral"
    title = "Mixtral"
    order = 10
    config_class = "MixtralConfig"

    def moe_settings(self, hf: Any) -> dict[str, Any]:
        return {"router": {"normalize": True}}  # Mixtral always renormalises (it has no norm_topk_prob)

    def refusals(self, hf: Any) -> Refusals:
        window = setting(hf, "sliding_window")
        yield window is not None, f"sliding-window attention (sliding_window={window})"

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        for present, what in (
            (not routing["norm_topk_prob"], "weights that are not renormalised"),
            (len(cfg.moe_layers) != cfg.n_layers, "dense layers"),
            (cfg.moe.num_shared, "shared experts"),
            (cfg.qkv_bias, "q/k/v biases"),
        ):
            if present:
                return f"Mixtral has no {what}"
        return None

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        moe = cfg.moe
        return {"intermediate_size": moe.expert_hidden, "num_local_experts": moe.num_experts, "sliding_window": None}
