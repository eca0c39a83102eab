"""gpt-oss (OpenAI 2025): a softmax over the top-k of the gate's logits, which have a bias (router=topk with gate_bias:
the same routing); experts with biases and the clamped SwiGLU (alpha 1.702, limit 7, up + 1: moe-lab's
swiglu_clamped), their gate and up columns interleaved and their weights stored (E, in, out); attention with q/k/v and
output biases, a learned sink logit per head, a sliding window on the layers `layer_types` names, and YaRN RoPE (its
default config's). Every layer is MoE; no shared expert.

Checkpoints whose experts are MXFP4-packed (OpenAI's released weights) are refused: moe-lab reads float weights;
transformers dequantises them (Mxfp4Config(dequantize=True)) into a folder moe-lab imports."""

from __future__ import annotations

from typing import Any, Optional

from moe_lab.interop.families.family import Family, Refusals, setting

CLAMPED_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}  # moe-lab's swiglu_clamped (experts.clamped_swiglu)


def _halves(interleaved: Any) -> Any:
    """Columns (gate0, up0, gate1, up1, ...) -> (gate..., up...) on the last dim of a tensor."""
    import torch  # this package imports no torch at import time: composing a command's help reads it

    return torch.cat([interleaved[..., 0::2], interleaved[..., 1::2]], dim=-1)


def _interleave(halves: Any) -> Any:
    import torch

    gate, up = halves.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


class GptOss(Family):
    model_type = "gpt_oss"
    title = "gpt-oss"
    order = 70
    config_class = "GptOssConfig"
    routing = "topk_softmax"
    router_gate = "mlp.router.weight"
    router_gate_bias = "mlp.router.bias"
    activations = ("swiglu_clamped",)
    expert_bias = True
    reads_attention_bias = True

    def settings(self, hf: Any) -> dict[str, Any]:
        types = list(setting(hf, "layer_types", None) or [])
        sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
        window = setting(hf, "sliding_window") if sliding else None
        bias = bool(setting(hf, "attention_bias", True))
        return {
            "qkv_bias": bias,
            "out_bias": bias,
            "qk_norm": None,
            "attention_sinks": True,
            "sliding_window": window,
            "sliding_layers": None if len(sliding) == len(types) else sliding,
        }

    def moe_settings(self, hf: Any) -> dict[str, Any]:
        return {
            "activation": "swiglu_clamped",
            "expert_bias": True,
            "router": {"name": "topk", "score": "softmax", "normalize": True, "gate_bias": True},
        }

    def refusals(self, hf: Any) -> Refusals:
        quantization = setting(hf, "quantization_config")
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        yield (
            quantization is not None,
            f"quantised experts (quantization_config: {method}; moe-lab reads float weights: load the model with "
            "transformers' Mxfp4Config(dequantize=True), save_pretrained it, and import that folder)",
        )
        for name, value in CLAMPED_SWIGLU.items():
            yield (
                setting(hf, name, value) != value,
                f"{name}={setting(hf, name)} (moe-lab's clamped SwiGLU has {value})",
            )
        types = set(setting(hf, "layer_types", None) or [])
        yield bool(types - {"sliding_attention", "full_attention"}), f"layer_types {sorted(types)}"

    def experts_in(self, gate_up: Any, down: Any) -> tuple[Any, Any]:
        return _halves(gate_up).transpose(1, 2), down.transpose(1, 2)  # (E, D, 2F) interleaved, (E, F, D)

    def experts_out(self, w_in: Any, w_out: Any) -> tuple[Any, Any]:
        return _interleave(w_in.transpose(1, 2)), w_out.transpose(1, 2)

    def gate_up_bias_in(self, bias: Any) -> Any:
        return _halves(bias)

    def gate_up_bias_out(self, bias: Any) -> Any:
        return _interleave(bias)

    def holds_attention(self, cfg: Any) -> bool:
        full = cfg.rope_dims in (None, cfg.head_dim)
        others = cfg.attention_gate or cfg.norm_offset or cfg.linear_layers is not None  # Qwen3-Next's
        return cfg.kv_lora_rank is None and cfg.attention_sinks and cfg.qk_norm is None and full and not others

    def cannot_express(self, cfg: Any, routing: dict) -> Optional[str]:
        for present, what in (
            (len(cfg.moe_layers) != cfg.n_layers, "dense layers"),
            (cfg.moe.num_shared, "shared experts"),
            (cfg.qkv_bias != cfg.out_bias, "q/k/v biases without an output bias, or the other way"),
        ):
            if present:
                return f"gpt-oss has no {what}"
        return None

    def hf_settings(self, cfg: Any, routing: dict) -> dict[str, Any]:
        window = cfg.sliding_window
        return {
            "intermediate_size": cfg.moe.expert_hidden,
            "num_local_experts": cfg.moe.num_experts,
            "attention_bias": cfg.qkv_bias,
            "sliding_window": window,
            "layer_types": [
                "sliding_attention" if cfg.is_sliding_layer(i) else "full_attention" for i in range(cfg.n_layers)
            ],
            **CLAMPED_SWIGLU,
        }
