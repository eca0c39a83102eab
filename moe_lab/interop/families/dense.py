"""The dense families moe-lab reads to upcycle (`model.init_from=... upcycle=...`): Llama, Qwen2 (q/k/v biases) and
Qwen3 (RMSNorm on queries and keys over each head)."""

from __future__ import annotations

from typing import Any

from moe_lab.interop.families.family import Family, Refusals, setting


def _attention_bias(hf: Any) -> Refusals:
    yield bool(setting(hf, "attention_bias", False)), "attention biases"


class Llama(Family):
    model_type = "llama"
    title = "Llama"
    order = 110
    moe = False

    def refusals(self, hf: Any) -> Refusals:
        return _attention_bias(hf)


class Qwen2(Family):
    model_type = "qwen2"
    title = "Qwen2"
    order = 120
    moe = False

    def settings(self, hf: Any) -> dict[str, Any]:
        return {"qkv_bias": True, "qk_norm": None}  # Qwen2's q, k and v projections always have biases


class Qwen3(Family):
    model_type = "qwen3"
    title = "Qwen3"
    order = 130
    moe = False
    qk_norm = "head"

    def refusals(self, hf: Any) -> Refusals:
        return _attention_bias(hf)
