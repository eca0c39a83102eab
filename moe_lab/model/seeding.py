"""Initial weights paired across configurations: each part of a model draws its initial weights from a random stream of
its own, seeded by (the seed in force, the part's name).

Without this, every part draws from one stream in construction order, so two models that differ in one part (a dense
FFN against an MoE layer, 8 experts against 16, one router against another) also start with different attention
weights and embeddings in every later layer: a comparison over seeds then pairs runs that share the data order but
not their shared weights. With it, `seed=1` gives the same embeddings, attention and output head to every model of
the same widths, and the seed's own luck in those parts cancels in a paired comparison.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch


def part_seed(base_seed: int, part: str) -> int:
    """A 63-bit seed from (base seed, part name), the same on every machine and Python run (no hash())."""
    digest = hashlib.sha256(f"{base_seed}:{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def seeded_part(part: str) -> Iterator[None]:
    """Parameters created inside draw from the stream of `part` under the current seed (torch.initial_seed(), which
    `seed_everything` sets); the process's own random stream is left as it was. Nested parts derive from their
    parent's seed, so a part's weights depend only on the seed and the names on its path."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(torch.initial_seed(), part))
        yield
