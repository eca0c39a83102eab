"""A decoder-only MoE transformer language model in one readable file.

Notable features:
    - pre-norm blocks with RMSNorm (Zhang & Sennrich 2019) and rotary position embeddings (Su et al. 2021),
      in the Llama/Mixtral convention (rotate-half), so the weights map one-to-one onto Hugging Face models;
    - causal attention (`attention.py`): grouped-query, or multi-head latent attention (DeepSeek-V2/V3);
    - SwiGLU FFNs (Shazeer 2020), replaced by an MoE layer (`moe.py`) in the layers `ModelConfig` chooses;
    - the model owns its accounting: parameter counts (total, active per token) and FLOPs per token.

Shape legend: B batch, S sequence, D d_model, V vocab, T = B * S.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.model.attention import KVCache, RMSNorm, RotaryEmbedding, build_attention, rotary_embedding
from moe_lab.model.checkpointing import checkpointed, recomputes
from moe_lab.model.config import ModelConfig
from moe_lab.model.experts import FeedForward, residual_out_std
from moe_lab.model.moe import MoELayer, MoELayerOutput
from moe_lab.model.replay import RoutingTape
from moe_lab.model.router_configs import router_config
from moe_lab.model.seeding import seeded_part


class Block(nn.Module):
    """Pre-norm transformer block whose FFN is dense or MoE."""

    def __init__(
        self, cfg: ModelConfig, layer: int, rope: Optional[RotaryEmbedding] = None, moe: Optional[bool] = None
    ):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        with seeded_part("attn"):
            self.attn = build_attention(cfg, rope, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        out_std = residual_out_std(cfg.init_std, cfg.n_layers)
        self.is_moe = cfg.is_moe_layer(layer) if moe is None else moe
        self.checkpointing = cfg.activation_checkpointing  # what backward recomputes (checkpointing.py)
        self.ffn: MoELayer | FeedForward
        with seeded_part("ffn"):  # an MoE layer and a dense FFN leave the attention's weights alone (seeding.py)
            if self.is_moe:
                self.ffn = MoELayer(
                    cfg.d_model,
                    cfg.moe_of(layer),
                    init_std=cfg.init_std,
                    out_std=out_std,
                    vocab_size=cfg.vocab_size,
                    layer=layer,
                )
            else:
                self.ffn = FeedForward(cfg.d_model, cfg.ffn_hidden, "swiglu", cfg.init_std, out_std)

    def forward(
        self,
        x_BSD: torch.Tensor,
        token_ids_BS: Optional[torch.Tensor] = None,
        positions_BS: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        domain_B: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[MoELayerOutput]]:
        """x + attention, then + FFN; with `activation_checkpointing` block or moe, that part recomputed in backward
        (checkpointing.py)."""
        if self.checkpointing == "block" and recomputes(self):
            moe_layers = [self.ffn] if isinstance(self.ffn, MoELayer) else []
            return checkpointed(self._forward, moe_layers, x_BSD, token_ids_BS, positions_BS, cache, domain_B)
        return self._forward(x_BSD, token_ids_BS, positions_BS, cache, domain_B)

    def _forward(
        self,
        x_BSD: torch.Tensor,
        token_ids_BS: Optional[torch.Tensor],
        positions_BS: Optional[torch.Tensor],
        cache: Optional[KVCache],
        domain_B: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, Optional[MoELayerOutput]]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), positions_BS, cache, self.layer)
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):
            if self.checkpointing == "moe" and recomputes(self):
                f_BSD, moe_out = checkpointed(self.ffn, [self.ffn], h_BSD, token_ids_BS, domain_B)
            else:
                f_BSD, moe_out = self.ffn(h_BSD, token_ids_BS, domain_B)
        else:
            f_BSD, moe_out = self.ffn(h_BSD), None
        return x_BSD + f_BSD, moe_out


class MultiTokenPrediction(nn.Module):
    """One of DeepSeek-V3's sequential multi-token prediction modules (DeepSeek-AI 2024, section 2.2), depth k: the
    previous depth's hidden state at position i (RMS-normed) and the embedding of token i + k (RMS-normed, the
    model's embedding) are joined by a projection, pass one transformer block (MoE if the model's last block is),
    and the model's output head (behind this module's own norm) predicts token i + k + 1. The chain keeps the causal
    order of predictions that parallel heads (Gloeckle et al. 2024) drop."""

    def __init__(self, cfg: ModelConfig, depth: int, rope: Optional[RotaryEmbedding] = None):
        super().__init__()
        D = cfg.d_model
        self.depth = depth
        self.hidden_norm = RMSNorm(D, cfg.norm_eps, cfg.norm_offset)
        self.embed_norm = RMSNorm(D, cfg.norm_eps, cfg.norm_offset)
        self.proj = nn.Linear(2 * D, D, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.init_std)
        # Numbered after the model's blocks: its routing statistics are those of layer n_layers + depth - 1.
        self.block = Block(cfg, cfg.n_layers + depth - 1, rope, moe=cfg.is_moe_layer(cfg.n_layers - 1))
        self.norm = RMSNorm(D, cfg.norm_eps, cfg.norm_offset)

    def forward(
        self,
        h_BSD: torch.Tensor,
        embedded_BSD: torch.Tensor,
        token_ids_BS: torch.Tensor,
        domain_B: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[MoELayerOutput]]:
        """h^{k-1} at positions 0..S-1 and the embeddings of tokens k..k+S-1 -> h^k (B, S, D)."""
        x_BSD = self.proj(torch.cat([self.hidden_norm(h_BSD), self.embed_norm(embedded_BSD)], dim=-1))
        return self.block(x_BSD, token_ids_BS, domain_B=domain_B)


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, S, V)
    loss: Optional[torch.Tensor] = None  # cross-entropy, when targets are given
    aux_loss: Optional[torch.Tensor] = None  # sum of weight * (aux loss averaged over MoE layers)
    # The aux losses training weights, unweighted, each averaged over MoE layers (every logged one: each layer's
    # MoELayerOutput.losses).
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    moe: dict[int, MoELayerOutput] = field(default_factory=dict)  # block index -> that layer's statistics
    # Multi-token prediction (model.mtp_depth): each depth's cross-entropy, and their weighted mean (the term the
    # training loss adds), when targets are given.
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    mtp_loss: Optional[torch.Tensor] = None


class MoETransformer(nn.Module):
    """Token ids (B, S) -> next-token logits (B, S, V), plus the MoE layers' losses and statistics."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (the trainer fills it from the tokenizer)")
        self.cfg = cfg
        # A router's own losses (ReLU routing's L1 penalty) come weighted by the router: weight 1 in the sum.
        self.own_loss_weights = dict.fromkeys(type(router_config(cfg.moe.router)).own_losses, 1.0)
        # Optimizer steps of the checkpoint the weights came from, when loaded from one (analyses plot by it).
        self.checkpoint_step: Optional[int] = None
        # Each part draws its initial weights from a stream of its own, seeded by (seed, its name): models that
        # differ in one part start alike in all the others, so seeds pair across configurations (seeding.py).
        with seeded_part("embed"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            nn.init.normal_(self.embed.weight, std=cfg.init_std)
        rope = rotary_embedding(cfg)  # shared by every layer
        blocks = []
        for layer in range(cfg.n_layers):
            with seeded_part(f"blocks.{layer}"):
                blocks.append(Block(cfg, layer, rope))
        self.blocks = cast("list[Block]", nn.ModuleList(blocks))
        mtp = []
        for depth in range(1, cfg.mtp_depth + 1):
            with seeded_part(f"mtp.{depth}"):
                mtp.append(MultiTokenPrediction(cfg, depth, rope))
        self.mtp = cast("list[MultiTokenPrediction]", nn.ModuleList(mtp))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        with seeded_part("lm_head"):
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def all_blocks(self) -> list[Block]:
        """The model's blocks, then the multi-token prediction modules' (numbered on after them)."""
        return [*self.blocks, *(module.block for module in self.mtp)]

    @property
    def moe_layers(self) -> list[int]:
        return [block.layer for block in self.all_blocks() if block.is_moe]

    def moe_modules(self) -> list[MoELayer]:
        return [block.ffn for block in self.all_blocks() if isinstance(block.ffn, MoELayer)]

    def layer_experts(self) -> Optional[tuple[int, ...]]:
        """Each MoE layer's number of routed experts where they differ (a model pruned to a total budget), else
        None: every layer has cfg.moe.num_experts."""
        counts = tuple(moe.num_experts for moe in self.moe_modules())
        return None if len(set(counts)) <= 1 else counts

    @property
    def stochastic_routing(self) -> bool:
        """Some router draws random numbers in training (noisy top-k, Switch jitter)."""
        return any(layer.router.stochastic for layer in self.moe_modules())

    def use_expert_parallel(self, group: Optional[torch.distributed.ProcessGroup], rank: int, size: int) -> None:
        """Expert parallelism over `group` (this process is `rank` of `size`): every MoE layer keeps its share of the
        experts and reaches the others by all-to-all. The model computes the same function as before."""
        for layer in self.moe_modules():
            layer.use_expert_parallel(group, rank, size)

    @contextlib.contextmanager
    def record_routing(self, tape: Optional[RoutingTape] = None) -> Iterator[RoutingTape]:
        """Inside the block, every MoE layer's selection of every forward goes on `tape` (a new one by default),
        under the tape's current `micro_batch` key (replay.py)."""
        with self._tape(tape if tape is not None else RoutingTape(), "record") as used:
            yield used

    @contextlib.contextmanager
    def replay_routing(self, tape: RoutingTape) -> Iterator[RoutingTape]:
        """Inside the block, every MoE layer takes the selection `tape` holds for its current `micro_batch` instead
        of its router's, weighted by its router's own scores (the contract in replay.py); a missing or mismatched
        selection raises `ReplayMismatch`."""
        with self._tape(tape, "replay") as used:
            yield used

    @contextlib.contextmanager
    def _tape(self, tape: RoutingTape, mode: str) -> Iterator[RoutingTape]:
        layers = self.moe_modules()
        if any(layer.tape is not None for layer in layers):
            raise RuntimeError("the model already records or replays its routing")
        try:
            for layer in layers:
                layer.tape, layer.tape_mode = tape, mode
            yield tape
        finally:
            for layer in layers:
                layer.tape, layer.tape_mode = None, None

    def after_optimizer_step(self, all_reduce=None) -> None:
        """Once per optimizer step: routers that learn outside the gradient (aux-loss-free bias) take their step."""
        for layer in self.moe_modules():
            layer.router.after_optimizer_step(all_reduce)

    def forward(
        self,
        token_ids_BS: torch.Tensor,
        targets_BS: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        valid_BS: Optional[torch.Tensor] = None,
        domain_B: Optional[torch.Tensor] = None,
    ) -> LMOutput:
        """Logits of every position. Generation passes a `cache`, which this call extends by S positions, and which
        of the new tokens are real (`valid_BS`; False = left padding, which no token attends to and which takes no
        position); training and evaluation pass neither. `domain_B` is each sequence's data domain, for routers that
        route by it (router=domain_oracle)."""
        B, S = token_ids_BS.shape
        end = S if cache is None else cache.length + S
        if end > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        positions_BS = None
        if cache is not None:
            valid_BS = torch.ones_like(token_ids_BS, dtype=torch.bool) if valid_BS is None else valid_BS
            positions_BS = (cache.seen_B[:, None] + valid_BS.cumsum(1) - 1).clamp(min=0)
            cache.valid_BC[:, cache.length : end] = valid_BS
            cache.seen_B += valid_BS.sum(1)
        x_BSD = self.embed(token_ids_BS)
        moe: dict[int, MoELayerOutput] = {}
        for block in self.blocks:
            x_BSD, moe_out = block(x_BSD, token_ids_BS, positions_BS, cache, domain_B)
            if moe_out is not None:
                moe[block.layer] = moe_out
        if cache is not None:
            cache.length = end
        logits_BSV = self.lm_head(self.norm(x_BSD))
        out = LMOutput(logits=logits_BSV, moe=moe)
        if targets_BS is not None:
            out.loss = F.cross_entropy(logits_BSV.float().view(B * S, -1), targets_BS.reshape(B * S))
        if cache is None and self.mtp:  # generation predicts one token at a time: it leaves them out
            self._predict_further(out, x_BSD, token_ids_BS, targets_BS, domain_B)
        if moe:
            names = next(iter(moe.values())).training_losses.keys()
            out.aux_losses = {n: torch.stack([m.training_losses[n] for m in moe.values()]).mean() for n in names}
            weights = {**self.cfg.moe.aux_loss.weights(), **self.own_loss_weights}
            weighted = [weights[n] * loss for n, loss in out.aux_losses.items() if weights[n] > 0]
            out.aux_loss = torch.stack(weighted).sum() if weighted else None
        return out

    def _predict_further(
        self,
        out: LMOutput,
        h_BSD: torch.Tensor,
        token_ids_BS: torch.Tensor,
        targets_BS: Optional[torch.Tensor],
        domain_B: Optional[torch.Tensor],
    ) -> None:
        """Multi-token prediction: depth k reads h^{k-1} at positions 0..S-k-1 and tokens k..S-1, and predicts tokens
        k+1..S (targets[:, k:]); its routing statistics join `out.moe`, its cross-entropy `out.mtp_losses`."""
        for module in self.mtp:
            k = module.depth
            if token_ids_BS.shape[1] <= k:
                break
            h_BSD, moe_out = module(h_BSD[:, :-1], self.embed(token_ids_BS[:, k:]), token_ids_BS[:, k:], domain_B)
            if moe_out is not None:
                out.moe[module.block.layer] = moe_out
            if targets_BS is not None:
                logits_BSV = self.lm_head(module.norm(h_BSD))
                out.mtp_losses.append(F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS[:, k:].flatten()))
        if out.mtp_losses:
            out.mtp_loss = self.cfg.mtp_loss_weight * torch.stack(out.mtp_losses).mean()

    # ----------------------------------------------------------------------------------------------------
    # Accounting

    def num_params(self) -> dict[str, int]:
        """Parameter counts: total, embedding, routed experts, and active per token (what a token multiplies by).

        active = every matmul weight a token passes through: attention, router, dense and shared FFNs, the top_k
        routed experts it chooses (a variable number: the target it is held at, or its cap), and the output head;
        the embedding lookup is not a matmul and is left out.
        """
        total = sum(p.numel() for p in self.parameters())
        embedding = self.embed.weight.numel()
        routed = routed_active = 0
        for layer in self.moe_modules():
            experts = layer.experts  # under expert parallelism a rank holds a slice; count every expert
            per_expert = weights_per_expert(layer)
            total += per_expert * (experts.total_experts - experts.num_experts)
            routed += per_expert * experts.total_experts
            routed_active += round(per_expert * layer.router.cfg.experts_computed_per_token(layer.num_experts))
        norms = sum(p.numel() for n, p in self.named_parameters() if n.endswith("norm.weight"))
        tied = embedding if self.cfg.tie_embeddings else 0
        # Tied embeddings are counted once in `total` (parameters() deduplicates) but still used by the head.
        active = total - embedding - routed + routed_active - norms + tied
        return {"total": total, "embedding": embedding, "routed_experts": routed, "active": active}

    def routed_expert_flops(self) -> dict[int, tuple[int, float]]:
        """Per MoE layer: (training FLOPs of one routed expert on one token, 6 x its weights; the experts per token
        that `flops_per_token` counts), to price the experts tokens actually took where their number varies."""
        out = {}
        for layer in self.moe_modules():
            experts_counted = layer.router.cfg.experts_computed_per_token(layer.num_experts)
            out[layer.layer] = (6 * weights_per_expert(layer), experts_counted)
        return out

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 * active parameters + attention, as PaLM Appendix B (12 * L * H * Dh * S;
        6 * L * H * (Dh + Dv) * S where values are narrower than queries and keys, as in latent attention)."""
        cfg = self.cfg
        blocks = cfg.n_layers + cfg.mtp_depth  # multi-token prediction: one more block and head use per depth
        attention = 6 * blocks * cfg.n_heads * (cfg.head_dim + cfg.v_head_dim) * seq_len
        heads = 6 * cfg.mtp_depth * self.lm_head.weight.numel()
        return 6 * self.num_params()["active"] + attention + heads


def weights_per_expert(layer: MoELayer) -> int:
    """The weights of one routed expert of `layer` (biases included)."""
    experts = layer.experts
    return sum(getattr(experts, w).numel() for w in experts.expert_weights) // experts.num_experts
