"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"): the
linear attention of Qwen3-Next's hybrid stack, three blocks of it to every block of attention.

Each value head keeps a state S (Dk, Dv) that every token updates by the delta rule on the decayed state, and reads
with its query:

    S_t = a_t S_{t-1} + k_t beta_t (v_t - a_t S_{t-1}^T k_t)^T,    o_t = S_t^T q_t / sqrt(Dk)

with q_t and k_t L2-normalised, the decay a_t = exp(g_t), g_t = -exp(A) softplus(alpha_t + dt_bias) (Mamba2's), and the
write strength beta_t = sigmoid(b_t). q, k and v come from one projection through a causal depthwise convolution
(kernel 4) and SiLU; o is RMS-normed per head, gated by SiLU(z) (z from the same projection), and projected back.

`recurrence` is the math, one step per position; `chunked_recurrence` computes the same a chunk at a time (the speed
form the layer uses, held to the recurrence by tests/test_model.py). Its projections keep transformers' layout (q, k,
v and z grouped by key head; b and a likewise), so that the weights map one to one.

Shape legend: B batch, S sequence, D d_model, Hk key heads, Hv value heads (a multiple of Hk), Dk key head dim,
Dv value head dim, C conv channels = 2 Hk Dk + Hv Dv, K conv kernel.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.model.config import ModelConfig
from moe_lab.model.experts import residual_out_std


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output (weight from 1), then times SiLU(gate): the output gate of Gated DeltaNet."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * normed * F.silu(gate.float())).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gated_delta_rule(
    q_BSHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    g_BSH: torch.Tensor,
    beta_BSH: torch.Tensor,
    state_BHKV: Optional[torch.Tensor] = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over the S positions (float32), from `state_BHKV` (zeros if None): the outputs (B, S, Hv, Dv)
    and the last state. q and k are per value head here (repeated over the value heads of their key head). `chunk`
    > 0 computes it chunk by chunk (`chunked_recurrence`, the speed form); 0 step by step (`recurrence`, the math)."""
    dtype = v_BSHV.dtype
    q, k, v, g, beta = (t.float().transpose(1, 2) for t in (q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH))  # heads first
    q, k = l2_normalize(q), l2_normalize(k)
    q = q / math.sqrt(q.shape[-1])
    B, H, S, K = k.shape
    state = torch.zeros(B, H, K, v.shape[-1], device=v.device) if state_BHKV is None else state_BHKV.float()
    if chunk and S > 1:
        o_BHSV, state = chunked_recurrence(q, k, v, g, beta, state, chunk)
    else:
        o_BHSV, state = recurrence(q, k, v, g, beta, state)
    return o_BHSV.transpose(1, 2).to(dtype), state


def recurrence(q, k, v, g, beta, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One step per position, heads first: (B, H, S, .) -> outputs (B, H, S, Dv), last state."""
    S = k.shape[2]
    outputs = []
    for t in range(S):
        state = state * g[:, :, t].exp()[..., None, None]
        recalled_BHV = (state * k[:, :, t, :, None]).sum(-2)  # S^T k: what the state holds for this key
        delta_BHV = (v[:, :, t] - recalled_BHV) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta_BHV[:, :, None, :]
        outputs.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outputs, dim=2), state


def chunked_recurrence(q, k, v, g, beta, state, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence, C positions at a time (the DeltaNet papers' chunkwise form, Yang et al. 2024): inside a
    chunk, with G_t the cumulative log decay and S0 the state before it, the writes u_t solve the unit lower-
    triangular system (I + A) U = beta V - beta e^G K S0, A_ts = beta_t e^(G_t - G_s) k_t.k_s (s < t); the outputs
    are e^G Q S0 + (e^(G_t - G_s) q_t.k_s, s <= t) U and the state after it e^(G_C) S0 + (e^(G_C - G) K)^T U. One
    triangular solve and a few matmuls per chunk instead of C steps. Padding writes nothing (beta = 0, g = 0)."""
    B, H, S, _ = k.shape
    pad = (-S) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (S + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)
    G = g.cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    decay_CC = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # e^(G_t - G_s), s <= t
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay_CC).tril(-1)
    T = A + torch.eye(chunk, device=k.device)
    W = torch.linalg.solve_triangular(T, beta[..., None] * v, upper=False, unitriangular=True)
    Z = torch.linalg.solve_triangular(T, (beta * G.exp())[..., None] * k, upper=False, unitriangular=True)
    attend_CC = (q @ k.transpose(-1, -2)) * decay_CC
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    outputs = []
    for i in range(n):
        U = W[:, :, i] - Z[:, :, i] @ state
        outputs.append(q_decayed[:, :, i] @ state + attend_CC[:, :, i] @ U)
        state = state * G[:, :, i, -1].exp()[..., None, None] + k_to_end[:, :, i].transpose(-1, -2) @ U
    return torch.cat(outputs, dim=2)[:, :, :S], state


class GatedDeltaNet(nn.Module):
    """A block's token mixer in place of attention (model.linear_layers)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.key_heads, self.value_heads = cfg.deltanet_key_heads, cfg.deltanet_value_heads
        self.key_dim, self.value_dim = cfg.deltanet_key_dim, cfg.deltanet_value_dim
        Kd, Vd = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        channels = 2 * Kd + Vd
        self.in_proj_qkvz = nn.Linear(D, 2 * Kd + 2 * Vd, bias=False)
        self.in_proj_ba = nn.Linear(D, 2 * self.value_heads, bias=False)
        self.conv1d = nn.Conv1d(channels, channels, cfg.deltanet_conv, groups=channels, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.value_heads))
        # A in [1, 16] spread over the heads, as log(A): decays from fast to slow (Mamba2 draws it at random).
        self.A_log = nn.Parameter(torch.linspace(1.0, 16.0, self.value_heads).log())
        self.norm = GatedRMSNorm(self.value_dim, cfg.norm_eps)
        self.out_proj = nn.Linear(Vd, D, bias=False)
        for lin in (self.in_proj_qkvz, self.in_proj_ba):
            nn.init.normal_(lin.weight, std=cfg.init_std)
        nn.init.normal_(self.out_proj.weight, std=residual_out_std(cfg.init_std, cfg.n_layers))

    def project(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q k v channels (B, S, C), z (B, S, Hv, Dv), b and a (B, S, Hv)): transformers' grouping per key head."""
        B, S, _ = x_BSD.shape
        r = self.value_heads // self.key_heads
        qkvz = self.in_proj_qkvz(x_BSD).view(B, S, self.key_heads, 2 * self.key_dim + 2 * r * self.value_dim)
        q, k, v, z = qkvz.split([self.key_dim, self.key_dim, r * self.value_dim, r * self.value_dim], dim=-1)
        b, a = self.in_proj_ba(x_BSD).view(B, S, self.key_heads, 2 * r).split([r, r], dim=-1)
        qkv_BSC = torch.cat([q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], dim=-1)
        return qkv_BSC, z.reshape(B, S, self.value_heads, -1), b.reshape(B, S, -1), a.reshape(B, S, -1)

    def forward(
        self,
        x_BSD: torch.Tensor,
        positions_BS: Optional[torch.Tensor] = None,
        cache: Optional[Any] = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """No positions (the recurrence is ordered); with a `cache` (attention.KVCache: generation), from its conv and
        recurrent state, padding positions zeroed so that they change neither."""
        B, S, _ = x_BSD.shape
        if cache is not None:
            x_BSD = x_BSD * cache.valid_BC[:, cache.length : cache.length + S, None].to(x_BSD.dtype)
        qkv_BSC, z_BSHV, b_BSH, a_BSH = self.project(x_BSD)
        qkv_BSC, state = self.convolve(qkv_BSC, cache, layer)
        Kd = self.key_heads * self.key_dim
        q, k, v = qkv_BSC.split([Kd, Kd, self.value_heads * self.value_dim], dim=-1)
        r = self.value_heads // self.key_heads  # each key head serves r value heads
        q = q.reshape(B, S, self.key_heads, self.key_dim).repeat_interleave(r, dim=2)
        k = k.reshape(B, S, self.key_heads, self.key_dim).repeat_interleave(r, dim=2)
        v = v.reshape(B, S, self.value_heads, self.value_dim)
        g_BSH = -self.A_log.float().exp() * F.softplus(a_BSH.float() + self.dt_bias)
        o_BSHV, state = gated_delta_rule(q, k, v, g_BSH, b_BSH.sigmoid(), state)
        if cache is not None:
            cache.recurrent[layer] = state
        return self.out_proj(self.norm(o_BSHV, z_BSHV).reshape(B, S, -1))

    def convolve(
        self, qkv_BSC: torch.Tensor, cache: Optional[Any], layer: int
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The causal depthwise convolution and SiLU (after the cache's last K - 1 inputs, when generating); the
        recurrent state to start from."""
        K, S = self.conv1d.kernel_size[0], qkv_BSC.shape[1]
        x_BCS = qkv_BSC.transpose(1, 2)
        if cache is None or layer not in cache.conv:
            before_BCK = x_BCS.new_zeros(x_BCS.shape[0], x_BCS.shape[1], K - 1)
        else:
            before_BCK = cache.conv[layer]
        x_BCS = torch.cat([before_BCK, x_BCS], dim=-1)
        state = None
        if cache is not None:
            cache.conv[layer] = x_BCS[:, :, -(K - 1) :].detach()
            state = cache.recurrent.get(layer)
        out_BCS = F.conv1d(x_BCS, self.conv1d.weight, groups=x_BCS.shape[1])[:, :, -S:]
        return F.silu(out_BCS).transpose(1, 2), state
