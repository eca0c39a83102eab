"""DeepSeek-V2 and -V3: known, not read yet (their attention is multi-head latent attention)."""

from __future__ import annotations

from moe_lab.interop.families.family import Family


class DeepSeekV3(Family):
    model_type = "deepseek_v3"
    title = "DeepSeek-V3"
    order = 200
    unsupported = (
        "moe-lab has no multi-head latent attention (q_lora_rank, kv_lora_rank); its sigmoid group-limited router, "
        "shared experts and first dense layers are supported (router=topk score=sigmoid num_groups=...)"
    )


class DeepSeekV2(DeepSeekV3):
    model_type = "deepseek_v2"
    title = "DeepSeek-V2"
    order = 201
