"""Qwen3-Next (Qwen3-Next-80B-A3B, 2025): a hybrid stack, Gated DeltaNet in three of every four blocks (`layer_types`:
linear_attention) and gated attention in the fourth (each head's output times the sigmoid of a gate from the query
projection, per-head q/k norms, RoPE on a quarter of each head by default); Qwen2-MoE's MoE block (softmax top-k over
hundreds of fine-grained experts, a sigmoid-gated shared expert, mlp_only_layers); every RMSNorm but DeltaNet's output
norm zero-centred (its weight an offset from 1). transformers' pure-torch Gated DeltaNet is the reference; moe-lab's is
the recurrence (moe_lab/model/deltanet.py), no CUDA kernel needed."""

from __future__ import annotations

from typing import Any, Optional

from moe_lab.interop.families.family import (
    Family,
    gated_shared_expert,
    partial_rotary_factor,
    qwen_moe_layout,
    rope_parameters,
    setting,
)


class Qwen3Next(Family):
    model_type = "qwen3_next"
    title = "Qwen3-Next"
    order = 80
    config_class = "Qwen3NextConfig"
    qk_norm = "head"
    reads_attention_bias = True

    def settings(self, hf: Any) -> dict[str, Any]:
        head_dim = setting(hf, "head_dim") or setting(hf, "hidden_size") // setting(hf, "num_attention_heads")
        rope_dims = int(head_dim * partial_rotary_factor(hf))
        types = list(setting(hf, "layer_types", None) or [])
        bias = bool(setting(hf, "attention_bias", False))
        return {
            "qkv_bias": bias,
            "out_bias": bias,
            "qk_norm": "head",
            "attention_gate": True,
            "norm_offset": True,
            "rope_dims": rope_dims if rope_dims != head_dim else None,
            "linear_layers": [i for i, kind in enumerate(types) if kind == "linear_attention"] or None,
            "deltanet_key_heads": setting(hf, "linear_num_key_heads"),
            "deltanet_key_dim": setting(hf, "linear_key_head_dim"),
            "deltanet_value_heads": setting(hf, "linear_num_value_heads"),
            "deltanet_value_dim": setting(hf, "linear_value_head_dim"),
            "deltanet_conv": setting(hf, "linear_conv_kernel_dim"),
        }

    def moe_settings(self, hf: Any) -> dict[str, Any]:
        return gated_shared_expert(hf)

    def refusals(self, hf: Any) -> Any:
        types = set(setting(hf, "layer_types", None) or [])
        yield bool(types - {"linear_attention", "full_attention"}), f"layer_types {sorted(types)}"
        yield setting(hf, "hidden_act") != "silu", f"hidden_act={setting(hf, 'hidden_act')} in Gated DeltaNet"

    def holds_attention(self, cfg: Any) -> bool:
        return (
            cfg.kv_lora_rank is None
            and cfg.qk_norm == "head"
            and cfg.attention_gate
            and cfg.norm_offset
            and not cfg.attention_sinks
            and cfg.sliding_window is None
        )

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        for present, what in (
            (cfg.moe.num_shared and not cfg.moe.shared_gate, "shared experts without their sigmoid gate"),
            (cfg.qkv_bias != cfg.out_bias, "q/k/v biases without an output bias, or the other way"),
            (int(cfg.head_dim * (cfg.rotary_dims / cfg.head_dim)) != cfg.rotary_dims, "such a partial rotary"),
        ):
            if present:
                return f"Qwen3-Next has no {what}"
        return None

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        return {
            **qwen_moe_layout(cfg, routing),
            "shared_expert_intermediate_size": cfg.moe.shared_width,
            "attention_bias": cfg.qkv_bias,
            "layer_types": [
                "linear_attention" if cfg.is_linear_layer(i) else "full_attention" for i in range(cfg.n_layers)
            ],
            "linear_num_key_heads": cfg.deltanet_key_heads,
            "linear_key_head_dim": cfg.deltanet_key_dim,
            "linear_num_value_heads": cfg.deltanet_value_heads,
            "linear_value_head_dim": cfg.deltanet_value_dim,
            "linear_conv_kernel_dim": cfg.deltanet_conv,
            "rope_parameters": {**rope_parameters(cfg), "partial_rotary_factor": cfg.rotary_dims / cfg.head_dim},
        }
