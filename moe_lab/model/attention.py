"""Attention and what it needs: RMSNorm, rotary position embeddings, the generation cache, and the two attentions
a block may have (`build_attention` picks by the config):

    - grouped-query attention (Ainslie et al. 2023; multi-head when Hkv = H), with optional q/k/v biases (Qwen2-MoE),
      q/k RMSNorm (Qwen3-MoE per head, OLMoE over the projection) and partial rotary embeddings (GLM-4.5);
    - multi-head latent attention (DeepSeek-V2, Liu et al. 2024; DeepSeek-V3): keys and values from a low-rank latent,
      with a decoupled RoPE part.

Shape legend: B batch, S sequence, D d_model, H heads, Hkv key/value heads, Dh query/key head dim, Dv value head dim,
R rotary dims, C cached positions, L latent rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.model.config import ModelConfig
from moe_lab.model.deltanet import GatedDeltaNet
from moe_lab.model.experts import residual_out_std


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 (Zhang & Sennrich 2019). With `offset` the weight is stored
    as its difference from 1 and starts at 0 (Qwen3-Next's zero-centred norm: weight decay pulls it to 1)."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: bool = False):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((1.0 + self.weight.float() if self.offset else self.weight) * x32).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for rotary position embeddings, rotate-half layout (as Llama and Mixtral in HF)."""

    cos_SDh: torch.Tensor
    sin_SDh: torch.Tensor

    def __init__(
        self, head_dim: int, max_seq_len: int, theta: float, inv_freq: Optional[torch.Tensor] = None, scale=1.0
    ):
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs_SDh2 = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        emb_SDh = torch.cat([freqs_SDh2, freqs_SDh2], dim=-1)
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("cos_SDh", emb_SDh.cos() * scale, persistent=False)
        self.register_buffer("sin_SDh", emb_SDh.sin() * scale, persistent=False)

    def forward(
        self, q_BHSDh: torch.Tensor, k_BHSDh: torch.Tensor, positions_BS: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate by position: 0..S-1, or `positions_BS` (generation: after a cache, or behind left padding)."""
        if positions_BS is None:
            S = q_BHSDh.shape[-2]
            cos, sin = self.cos_SDh[:S], self.sin_SDh[:S]
        else:
            cos, sin = self.cos_SDh[positions_BS].unsqueeze(1), self.sin_SDh[positions_BS].unsqueeze(1)  # (B,1,S,Dh)
        cos, sin = cos.to(q_BHSDh.dtype), sin.to(q_BHSDh.dtype)
        return q_BHSDh * cos + _rotate_half(q_BHSDh) * sin, k_BHSDh * cos + _rotate_half(k_BHSDh) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class KVCache:
    """Keys and values of the positions seen so far, for generation: per layer (B, Hkv, capacity, Dh) keys and
    (B, Hkv, capacity, Dv) values filled left to right, and which of those positions are real tokens (left padding is
    not). Multi-head latent attention caches its expanded keys and values here (Hkv = H), not its latent."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype):
        k_shape = (batch, cfg.kv_heads, capacity, cfg.head_dim)
        v_shape = (batch, cfg.kv_heads, capacity, cfg.v_head_dim)
        self.k = [torch.zeros(k_shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(v_shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.valid_BC = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        # Gated DeltaNet blocks (deltanet.py): each one's last conv inputs and recurrent state, by layer.
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        self.seen_B = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens so far, per sequence
        self.length = 0  # positions filled

    def append(self, layer: int, k_BHSDh: torch.Tensor, v_BHSDv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values at the next positions; returns all of them so far."""
        S = k_BHSDh.shape[2]
        end = self.length + S
        if end > self.k[layer].shape[2]:
            raise ValueError(f"the KV cache holds {self.k[layer].shape[2]} positions; {end} are needed")
        self.k[layer][:, :, self.length : end] = k_BHSDh
        self.v[layer][:, :, self.length : end] = v_BHSDv
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def attend(
    q_BHSDh: torch.Tensor,
    k_BHSDh: torch.Tensor,
    v_BHSDv: torch.Tensor,
    cache: Optional[KVCache],
    layer: int,
    window: Optional[int] = None,
    sinks_H: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal scaled-dot-product attention (1/sqrt(Dh) scale), (B, H, S, Dv). With a `cache` (generation), over the
    cached positions too, skipping the cache's padding. Fewer key/value heads than query heads is grouped-query. A
    `window` limits each query to the last `window` positions; `sinks_H` are learned logits, one per head, that join
    each softmax without a value (attention sinks)."""
    gqa = k_BHSDh.shape[1] != q_BHSDh.shape[1]
    if cache is None and window is None and sinks_H is None:
        return F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDv, is_causal=True, enable_gqa=gqa)
    S = q_BHSDh.shape[2]
    if cache is not None:
        k_BHSDh, v_BHSDv = cache.append(layer, k_BHSDh, v_BHSDv)
    C = k_BHSDh.shape[2]
    # Query i (position C - S + i) sees the positions up to its own (the real ones, in a cache), within the window;
    # and always itself, so a padding query never sees nothing.
    query_S = torch.arange(C - S, C, device=q_BHSDh.device)
    key_C = torch.arange(C, device=q_BHSDh.device)
    allowed_SC = key_C[None, :] <= query_S[:, None]
    if window is not None:
        allowed_SC = allowed_SC & (key_C[None, :] > query_S[:, None] - window)
    allowed_BSC = allowed_SC[None] & (cache.valid_BC[:, None, :C] if cache is not None else True)
    allowed_BSC = allowed_BSC | (key_C[None, :] == query_S[:, None])[None]
    if sinks_H is None:
        return F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDv, attn_mask=allowed_BSC[:, None], enable_gqa=gqa)
    return attend_with_sinks(q_BHSDh, k_BHSDh, v_BHSDv, allowed_BSC, sinks_H)


def attend_with_sinks(
    q_BHSDh: torch.Tensor,
    k_BHCDh: torch.Tensor,
    v_BHCDv: torch.Tensor,
    allowed_BSC: torch.Tensor,
    sinks_H: torch.Tensor,
) -> torch.Tensor:
    """softmax over [q k / sqrt(Dh) | sink] (the sink's column dropped after): scaled-dot-product attention has no
    place for a logit without a key, so this one is written out (float32 softmax)."""
    H, Hkv = q_BHSDh.shape[1], k_BHCDh.shape[1]
    k_BHCDh, v_BHCDv = k_BHCDh.repeat_interleave(H // Hkv, dim=1), v_BHCDv.repeat_interleave(H // Hkv, dim=1)
    scores_BHSC = (q_BHSDh @ k_BHCDh.transpose(-2, -1)) / math.sqrt(q_BHSDh.shape[-1])
    scores_BHSC = scores_BHSC.float().masked_fill(~allowed_BSC[:, None], float("-inf"))
    B, _, S, _ = scores_BHSC.shape
    sink_BHS1 = sinks_H.float()[None, :, None, None].expand(B, H, S, 1)
    probs_BHSC = torch.cat([scores_BHSC, sink_BHS1], dim=-1).softmax(dim=-1)[..., :-1]
    return probs_BHSC.to(v_BHCDv.dtype) @ v_BHCDv


class CausalSelfAttention(nn.Module):
    """Grouped-query attention (multi-head when n_kv_heads = n_heads) with RoPE on the first R dims of each head."""

    def __init__(self, cfg: ModelConfig, rope: Optional[RotaryEmbedding] = None, window: Optional[int] = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.rope_dims = cfg.rotary_dims
        # With attention_gate, each head's rows are [query | gate] (Qwen3-Next's layout).
        self.gated = cfg.attention_gate
        q_width = cfg.n_heads * cfg.head_dim * (2 if cfg.attention_gate else 1)
        self.q_proj = nn.Linear(cfg.d_model, q_width, bias=cfg.qkv_bias)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)  # k and v fused
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)
        # One table for the whole model (an imported model's 128k positions take 134 MB; not once per layer).
        self.rope = rope if rope is not None else rotary_embedding(cfg)
        # QK-norm: over each head (Qwen3-MoE) or over the whole projection (OLMoE), before RoPE.
        self.qk_norm = cfg.qk_norm
        q_width, k_width = (
            (cfg.head_dim, cfg.head_dim)
            if cfg.qk_norm == "head"
            else (cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
        )
        self.q_norm = RMSNorm(q_width, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        for lin in (self.q_proj, self.kv_proj):
            nn.init.normal_(lin.weight, std=cfg.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.o_proj.weight, std=residual_out_std(cfg.init_std, cfg.n_layers))
        if self.o_proj.bias is not None:
            nn.init.zeros_(self.o_proj.bias)
        self.window = window  # this layer's sliding window; None: full attention
        self.sinks_H = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attention_sinks else None

    def forward(
        self,
        x_BSD: torch.Tensor,
        positions_BS: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Causal attention over the sequence; with a `cache` (generation), over the cached positions too, at
        `positions_BS`, skipping the cache's padding."""
        B, S, _ = x_BSD.shape
        q_BSX = self.q_proj(x_BSD)
        gate_BSX = None
        if self.gated:
            q_BSHX, gate_BSHX = q_BSX.view(B, S, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
            q_BSX, gate_BSX = q_BSHX.reshape(B, S, -1), gate_BSHX.reshape(B, S, -1)
        k_BSX, v_BSX = self.kv_proj(x_BSD).chunk(2, dim=-1)
        if self.qk_norm == "full" and self.q_norm is not None and self.k_norm is not None:
            q_BSX, k_BSX = self.q_norm(q_BSX), self.k_norm(k_BSX)
        q_BSHDh = q_BSX.view(B, S, self.n_heads, self.head_dim)
        k_BSHDh = k_BSX.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head" and self.q_norm is not None and self.k_norm is not None:
            q_BSHDh, k_BSHDh = self.q_norm(q_BSHDh), self.k_norm(k_BSHDh)
        q_BHSDh, k_BHSDh = q_BSHDh.transpose(1, 2), k_BSHDh.transpose(1, 2)
        v_BHSDh = v_BSX.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSDh, k_BHSDh = self.rotate(q_BHSDh, k_BHSDh, positions_BS)
        y_BHSDh = attend(q_BHSDh, k_BHSDh, v_BHSDh, cache, layer, self.window, self.sinks_H)
        y_BSX = y_BHSDh.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self.o_proj(y_BSX if gate_BSX is None else y_BSX * torch.sigmoid(gate_BSX))

    def rotate(
        self, q_BHSDh: torch.Tensor, k_BHSDh: torch.Tensor, positions_BS: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on every dim, or on the first R of each head (partial rotary: the rest pass through)."""
        R = self.rope_dims
        if R == self.head_dim:
            return self.rope(q_BHSDh, k_BHSDh, positions_BS)
        q_BHSR, k_BHSR = self.rope(q_BHSDh[..., :R], k_BHSDh[..., :R], positions_BS)
        return torch.cat([q_BHSR, q_BHSDh[..., R:]], dim=-1), torch.cat([k_BHSR, k_BHSDh[..., R:]], dim=-1)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, section 2.1; DeepSeek-V3 section 2.1.1).

    Keys and values of every head are projected up from one latent c_KV of L = kv_lora_rank dims per token (RMS-
    normed), and queries optionally from a latent of q_lora_rank dims: an inference engine caches c_KV and one shared
    RoPE key instead of H full keys and values. RoPE is decoupled: each query head is [q_nope (Dh - R) | q_rope (R)],
    each key head [k_nope | k_rope], with k_rope one R-dim projection of the token shared by all heads; only the rope
    parts rotate. Values are Dv wide. This module caches expanded keys and values (the math is the same).
    """

    def __init__(self, cfg: ModelConfig, rope: Optional[RotaryEmbedding] = None):
        super().__init__()
        assert cfg.kv_lora_rank is not None
        D, H, L = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank
        self.n_heads, self.head_dim, self.v_head_dim = H, cfg.head_dim, cfg.v_head_dim
        self.rope_dims, self.nope_dims = cfg.rotary_dims, cfg.head_dim - cfg.rotary_dims
        # DeepSeek's latent norms use eps 1e-6 whatever rms_norm_eps says (its RMSNorm's default).
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.head_dim, bias=False)
        self.kv_a_proj = nn.Linear(D, L + self.rope_dims, bias=False)  # the latent and the shared rope key
        self.kv_a_norm = RMSNorm(L, 1e-6)
        self.kv_b_proj = nn.Linear(L, H * (self.nope_dims + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=False)
        self.rope = rope if rope is not None else rotary_embedding(cfg)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.o_proj:
                nn.init.normal_(module.weight, std=cfg.init_std)
        nn.init.normal_(self.o_proj.weight, std=residual_out_std(cfg.init_std, cfg.n_layers))

    def queries(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x_BSD)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))

    def forward(
        self,
        x_BSD: torch.Tensor,
        positions_BS: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, R, N, Dv = self.n_heads, self.rope_dims, self.nope_dims, self.v_head_dim
        q_BHSDh = self.queries(x_BSD).view(B, S, H, N + R).transpose(1, 2)
        latent_BSL, k_rope_BSR = self.kv_a_proj(x_BSD).split([self.kv_a_norm.weight.numel(), R], dim=-1)
        kv_BHSX = self.kv_b_proj(self.kv_a_norm(latent_BSL)).view(B, S, H, N + Dv).transpose(1, 2)
        k_nope_BHSN, v_BHSDv = kv_BHSX.split([N, Dv], dim=-1)
        q_rope_BHSR, k_rope_B1SR = self.rope(q_BHSDh[..., N:], k_rope_BSR[:, None], positions_BS)
        q_BHSDh = torch.cat([q_BHSDh[..., :N], q_rope_BHSR], dim=-1)
        k_BHSDh = torch.cat([k_nope_BHSN, k_rope_B1SR.expand(B, H, S, R)], dim=-1)
        y_BHSDv = attend(q_BHSDh, k_BHSDh, v_BHSDv, cache, layer)
        return self.o_proj(y_BHSDv.transpose(1, 2).reshape(B, S, H * Dv))


def rotary_embedding(cfg: ModelConfig) -> RotaryEmbedding:
    """The model's RoPE table: over the rotary dims of a head, up to max_seq_len positions (YaRN-scaled if set)."""
    if cfg.rope_scaling_factor is None:
        return RotaryEmbedding(cfg.rotary_dims, cfg.max_seq_len, cfg.rope_theta)
    inv_freq, scale = yarn_frequencies(cfg)
    return RotaryEmbedding(cfg.rotary_dims, cfg.max_seq_len, cfg.rope_theta, inv_freq, scale)


def yarn_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension", section 3.2-3.4): per frequency, a ramp
    from interpolation (divided by the factor: wavelengths longer than the original context) to extrapolation (kept:
    the fast ones), between the dims that turn beta_slow and beta_fast times over the original context; and the
    attention temperature 0.1 ln(factor) + 1, applied to cos and sin."""
    dim, base, factor = cfg.rotary_dims, cfg.rope_theta, float(cfg.rope_scaling_factor or 1.0)
    original = float(cfg.rope_original_max_seq_len or cfg.max_seq_len)

    def dim_of(rotations: float) -> float:  # the dim whose frequency turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    inv_freq = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    return inv_freq, (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0


def build_attention(cfg: ModelConfig, rope: Optional[RotaryEmbedding] = None, layer: int = 0) -> nn.Module:
    """The token mixer of block `layer`: latent attention (MLA) when model.kv_lora_rank is set, Gated DeltaNet in the
    model's linear layers, else grouped-query attention (over a sliding window in the model's sliding layers)."""
    if cfg.kv_lora_rank is not None:
        return LatentAttention(cfg, rope)
    if cfg.is_linear_layer(layer):
        return GatedDeltaNet(cfg)
    return CausalSelfAttention(cfg, rope, cfg.sliding_window if cfg.is_sliding_layer(layer) else None)
