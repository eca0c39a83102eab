"""The arithmetic of docs/scaling.md: memory per GPU and all-to-all bytes per step of a model on a parallel layout.

    python -m moe_lab.tools.scaling          # the table of docs/scaling.md

A layout is W GPUs in expert-parallel groups of P (model.moe.expert_parallel) and W / P data-parallel replicas of each
group. moe-lab today (Lightning DDP with expert parallelism, training/strategy.py) holds on every GPU all the dense
weights (attention, norms, embeddings, routers, shared experts) and E / P of each MoE layer's routed experts, each
weight with its float32 gradient and AdamW's two float32 moments: 16 bytes a parameter. With FSDP2 (torchtitan's
composition, not built in moe-lab) the dense weights and the experts' replicas are sharded too, over all W GPUs.
Activations are not counted (they depend on the batch, the sequence and activation checkpointing).

An all-to-all moves each routed token slot whose expert lives on another rank of the group: with routing spread evenly,
(P - 1) / P of the T x k slots of a rank's T tokens, d_model values each, out (dispatch) and back (combine), in the
forward pass and again, as gradients, in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lab.model.config import GATED_ACTIVATIONS, ModelConfig, MoEConfig
from moe_lab.model.routers import TopKRouterConfig

BYTES_PER_TRAINED_PARAM = 16  # float32 weight, gradient and AdamW's two moments
GIB = 2**30


def _moe(experts: int, top_k: int, width: int, **kwargs) -> MoEConfig:
    return MoEConfig(num_experts=experts, expert_hidden=width, router=TopKRouterConfig(top_k=top_k), **kwargs)


# The reference models, as moe-lab's settings would build them (their published configs). DeepSeek-V3's multi-head
# latent attention is not in moe-lab: its stand-in here is grouped-query attention of 128 heads of 128 with 8 KV heads,
# which has fewer parameters than MLA's 0.19B per layer (0.2% of the model either way).
REFERENCE_MODELS = {
    "OLMoE-1B-7B": ModelConfig(
        name="OLMoE-1B-7B", vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, qk_norm="full", ffn_hidden=8192,
        max_seq_len=4096, moe=_moe(64, 8, 1024),
    ),
    "Mixtral-8x7B": ModelConfig(
        name="Mixtral-8x7B", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
        max_seq_len=4096, moe=_moe(8, 2, 14336),
    ),
    "DeepSeek-V3-like": ModelConfig(
        name="deepseek-v3-like", vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, n_kv_heads=8,
        head_size=128, ffn_hidden=18432, max_seq_len=4096,
        moe=_moe(256, 8, 2048, num_shared=1, first_dense_layers=3),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """One model on `gpus` GPUs in expert-parallel groups of `expert_parallel`, `tokens` tokens per GPU per step."""

    gpus: int
    expert_parallel: int
    tokens: int = 8192

    @property
    def data_parallel(self) -> int:
        return self.gpus // self.expert_parallel


def routed_expert_params(cfg: ModelConfig) -> int:
    """Parameters of the routed experts of every MoE layer (the part expert parallelism divides)."""
    moe = cfg.moe
    gated = 3 if GATED_ACTIVATIONS[moe.activation] else 2
    width = moe.latent_dim or cfg.d_model  # latent experts work in their latent
    per_expert = gated * width * moe.expert_hidden + ((gated - 1) * moe.expert_hidden + width if moe.expert_bias else 0)
    return len(cfg.moe_layers) * moe.num_experts * per_expert


def active_params(cfg: ModelConfig) -> int:
    """Active parameters as the papers count them (embeddings included): all but the routed experts a token is not
    sent to. (MoETransformer.num_params()["active"] counts matmul weights only, for FLOPs.)"""
    experts = routed_expert_params(cfg)
    return cfg.size_estimate()[0] - experts + experts * cfg.moe.router.top_k // cfg.moe.num_experts


def params_per_gpu(cfg: ModelConfig, layout: Layout, fsdp: bool = False) -> int:
    """Parameters one GPU holds: every dense one and 1 / P of the routed experts (DDP), or 1 / W of all
    (trainer=fsdp, FSDP2 beside expert parallelism)."""
    total = cfg.size_estimate()[0]
    if fsdp:
        return -(-total // layout.gpus)
    experts = routed_expert_params(cfg)
    return total - experts + experts // layout.expert_parallel


def training_bytes_per_gpu(cfg: ModelConfig, layout: Layout, fsdp: bool = False) -> int:
    """Weights, gradients and AdamW moments on one GPU (activations not counted)."""
    return BYTES_PER_TRAINED_PARAM * params_per_gpu(cfg, layout, fsdp)


def all_to_all_bytes_per_step(cfg: ModelConfig, layout: Layout, bytes_per_value: int = 2) -> int:
    """Bytes one GPU sends by all-to-all in a training step (bfloat16 activations by default): dispatch and combine,
    forward and backward, in every MoE layer; zero without expert parallelism."""
    P = layout.expert_parallel
    slots = layout.tokens * cfg.moe.router.top_k
    width = cfg.moe.latent_dim or cfg.d_model  # latent experts: the rows travel in the latent
    per_layer = 4 * slots * width * bytes_per_value * (P - 1) // P
    return len(cfg.moe_layers) * per_layer


# The layouts of docs/scaling.md: expert parallelism inside an 8-GPU node where the experts allow, across nodes for
# the 256-expert model (DeepSeek-V3 trained with expert parallelism 64 over 8 nodes).
LAYOUTS = {
    "OLMoE-1B-7B": [Layout(8, 8), Layout(64, 8), Layout(256, 8), Layout(1024, 8)],
    "Mixtral-8x7B": [Layout(8, 8), Layout(64, 8), Layout(256, 8), Layout(1024, 8)],
    "DeepSeek-V3-like": [Layout(8, 8), Layout(64, 64), Layout(256, 64), Layout(1024, 64)],
}


def table() -> str:
    """The docs/scaling.md table: per model and layout, what one GPU holds and sends."""
    head = (
        "| model (total / active params) | GPUs | expert parallel x data parallel | params per GPU, DDP | "
        "training state per GPU, DDP | trainer=fsdp | all-to-all sent per GPU per step |\n|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for name, cfg in REFERENCE_MODELS.items():
        sizes = f"{cfg.size_estimate()[0] / 1e9:.1f}B / {active_params(cfg) / 1e9:.1f}B"
        for layout in LAYOUTS[name]:
            rows.append(
                f"| {name} ({sizes}) | {layout.gpus} | {layout.expert_parallel} x {layout.data_parallel} | "
                f"{params_per_gpu(cfg, layout) / 1e9:.2f}B | {training_bytes_per_gpu(cfg, layout) / GIB:.0f} GiB | "
                f"{training_bytes_per_gpu(cfg, layout, fsdp=True) / GIB:.1f} GiB | "
                f"{all_to_all_bytes_per_step(cfg, layout) / GIB:.1f} GiB |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
