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

from moe_lab.interop.families.family import Family, Refusals, setting


class DeepSeekV3(Family):
    model_type = "deepseek_v3"
    title = "DeepSeek-V3"
    order = 50
    config_class = "DeepseekV3Config"
    latent_attention = True
    routing = "sigmoid"
    router_bias = "mlp.gate.e_score_correction_bias"
    shared_expert = "mlp.shared_experts."
    shared_expert_gate = None

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

    def moe_layers(self, hf: Any) -> list[int]:
        return list(range(setting(hf, "first_k_dense_replace", 0) or 0, setting(hf, "num_hidden_layers")))

    def interleaved_rope(self, hf: Any) -> bool:
        return bool(setting(hf, "rope_interleave", True))

    def refusals(self, hf: Any) -> Refusals:
        heads, kv_heads = setting(hf, "num_attention_heads"), setting(hf, "num_key_value_heads")
        yield (
            kv_heads not in (None, heads),
            f"num_key_value_heads={kv_heads} unlike num_attention_heads={heads} (latent attention gives every head "
            "its keys and values)",
        )

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        moe = cfg.moe
        first = cfg.moe_layers[0] if cfg.moe_layers else 0
        for present, what in (
            (cfg.moe_layers != list(range(first, cfg.n_layers)), "MoE layers but all after its first dense ones"),
            (moe.shared_gate, "gate on its shared experts"),
            (moe.shared_width % moe.expert_hidden, "shared experts whose width is not a multiple of an expert's"),
        ):
            if present:
                return f"DeepSeek-V3 has no {what}"
        return None

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        moe = cfg.moe
        return {
            "intermediate_size": cfg.ffn_hidden,
            "moe_intermediate_size": moe.expert_hidden,
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": moe.shared_width // moe.expert_hidden,
            "first_k_dense_replace": cfg.moe_layers[0],
            "kv_lora_rank": cfg.kv_lora_rank,
            "q_lora_rank": cfg.q_lora_rank,
            "head_dim": cfg.rotary_dims,  # transformers' DeepSeek-V3 sizes its RoPE table by head_dim
            "qk_rope_head_dim": cfg.rotary_dims,
            "qk_nope_head_dim": cfg.head_dim - cfg.rotary_dims,
            "v_head_dim": cfg.v_head_dim,
            "rope_interleave": True,
            "attention_bias": False,
            "num_mtp_layers": 0,
            **{k: v for k, v in routing.items() if k != "top_k"},
        }


class DeepSeekV2(Family):
    model_type = "deepseek_v2"
    title = "DeepSeek-V2"
    order = 201
    unsupported = (
        "its router is a softmax with group-limited greedy selection and DeepSeek-V2's own balance losses, which "
        "moe-lab does not have; DeepSeek-V3 (model_type deepseek_v3) is read"
    )
