"""What fits in this machine's memory: the check that refuses a model too large to build, before it is built.

A leaf module (standard library only). Memory is the smaller of the physical memory and the cgroup limit (a
container's or a SLURM job's), read once.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from moe_lab.errors import UserError


@functools.lru_cache(maxsize=1)
def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or less where a cgroup limits it."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def check_fits(cfg, bytes_per_param: int, purpose: str, fix: str) -> None:
    """UserError unless a model of settings `cfg` (a ModelConfig) can be held in memory at `bytes_per_param` bytes
    per parameter (4: float32 weights; 8: a model read through transformers, whose copy and moe-lab's coexist; 16:
    training with AdamW: weights, gradients and two moments), plus its float32 buffers."""
    params, buffers = cfg.size_estimate()
    needed = params * bytes_per_param + buffers * 4
    available = machine_memory()
    if needed <= available:
        return
    moe = cfg.moe
    experts = (
        f"{len(cfg.moe_layers)} MoE layers of {moe.num_experts} experts of width {moe.expert_hidden}"
        if moe.enabled
        else f"dense FFNs of width {cfg.ffn_hidden}"
    )
    raise UserError(
        f"{purpose} needs about {_size(needed)} ({params:.3g} parameters at {bytes_per_param} bytes each"
        f", plus {_size(buffers * 4)} of position tables), more than the {_size(available)} of memory "
        f"here: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads of {cfg.head_dim}, "
        f"vocabulary {cfg.vocab_size or 'from the tokenizer'}, {cfg.max_seq_len} positions, {experts}. "
        f"{fix}"
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"
