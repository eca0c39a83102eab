"""`moe-lab analyze --stability`: how often a token's set of experts changes when only the way the model is run
changes, the number RL papers quote for why the trainer must replay the sampler's routing (Megatron-LM #4168: ~10%
of router decisions differ between the sampler and the trainer, 94% of tokens in at least one layer).

The same checkpoint, the same held-out tokens, in pairs of settings against the reference (eval mode, float32, the
batch as it comes):

    rerun        the reference again: 0 on a deterministic machine (a control for nondeterministic kernels)
    bfloat16     under bfloat16 autocast (routers compute in float32 from the bf16 hidden states before them)
    train_mode   in training mode (noisy routers draw their noise; Sinkhorn balances; training capacity)
    alone        each sequence in a batch of its own (routers that couple tokens: expert choice, Sinkhorn)
    checkpoint   each earlier checkpoint given (oldest first) against the last

Per layer, the share of tokens whose expert set differs (any size of set: expert choice gives none, one or many);
the share that differ in at least one layer; and the token ids that flip most often. Known answers: identical
settings give 0; the hash router, a function of the token id, gives 0 under any setting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from moe_lab.model import MoETransformer

SETTINGS = {
    "rerun": "the same settings again",
    "bfloat16": "float32 vs bfloat16 autocast",
    "train_mode": "evaluation vs training mode",
    "alone": "in its batch vs alone",
}


@torch.no_grad()
def expert_sets(model: MoETransformer, inputs_BS: torch.Tensor, domain_B: Optional[torch.Tensor]) -> torch.Tensor:
    """(L, T, E) bool: which experts took each token in every MoE layer, before capacity."""
    out = model(inputs_BS, domain_B=domain_B)
    T, E = inputs_BS.numel(), model.cfg.moe.num_experts
    chosen_LTE = torch.zeros(len(model.moe_layers), T, E + 1, dtype=torch.bool, device=inputs_BS.device)
    for l, layer in enumerate(model.moe_layers):
        stats = out.moe[layer]
        no_expert = stats.expert_N >= stats.routing.num_experts  # this layer's id of no expert, E wherever it is
        chosen_LTE[l, stats.token_N, stats.expert_N.masked_fill(no_expert, E)] = True
    return chosen_LTE[..., :E]  # a slot of no expert (top-p's, id E) chooses nothing


@contextlib.contextmanager
def in_training_mode(model: MoETransformer, seed: int) -> Iterator[None]:
    """Training mode (noise from a generator seeded by `seed`), leaving the model, its buffers and the process's
    random stream as they were."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        try:
            yield
        finally:
            model.eval()
            for name, b in model.named_buffers():
                b.copy_(buffers[name])  # e.g. aux_free's pending counts


def setting_sets(
    name: str, model: MoETransformer, inputs_BS: torch.Tensor, domain_B: Optional[torch.Tensor], seed: int
) -> torch.Tensor:
    """The expert sets of one of SETTINGS."""
    if name == "rerun":
        return expert_sets(model, inputs_BS, domain_B)
    if name == "bfloat16":
        with torch.autocast(device_type=inputs_BS.device.type, dtype=torch.bfloat16):
            return expert_sets(model, inputs_BS, domain_B)
    if name == "train_mode":
        with in_training_mode(model, seed):
            return expert_sets(model, inputs_BS, domain_B)
    if name == "alone":
        one = [
            expert_sets(model, inputs_BS[b : b + 1], None if domain_B is None else domain_B[b : b + 1])
            for b in range(inputs_BS.shape[0])
        ]
        return torch.cat(one, dim=1)  # tokens are batch-major: sequence b's are b*S .. b*S + S - 1
    raise ValueError(f"no stability setting {name!r}; the settings are {', '.join(SETTINGS)}")


@dataclass
class Flips:
    """One comparison's counts: tokens whose expert set differs, per layer and in any layer, and per token id."""

    layers: int
    vocab_size: int
    tokens: int = 0
    flipped_L: np.ndarray = field(init=False)
    any_layer: int = 0
    seen_V: np.ndarray = field(init=False)
    flipped_V: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.flipped_L = np.zeros(self.layers, dtype=np.int64)
        self.seen_V = np.zeros(self.vocab_size, dtype=np.int64)
        self.flipped_V = np.zeros(self.vocab_size, dtype=np.int64)

    def add(self, reference_LTE: torch.Tensor, other_LTE: torch.Tensor, token_ids_T: np.ndarray) -> None:
        differs_LT = (reference_LTE != other_LTE).any(-1).cpu().numpy()
        anywhere_T = differs_LT.any(0)
        self.tokens += differs_LT.shape[1]
        self.flipped_L += differs_LT.sum(1)
        self.any_layer += int(anywhere_T.sum())
        np.add.at(self.seen_V, token_ids_T, 1)
        np.add.at(self.flipped_V, token_ids_T, anywhere_T.astype(np.int64))

    def summary(self, label: str, layers: list[int], decode=None, top: int = 10, min_count: int = 5) -> dict:
        rate_V = self.flipped_V / np.maximum(self.seen_V, 1)
        often = np.flatnonzero((self.seen_V >= min_count) & (self.flipped_V > 0))
        most = often[np.lexsort((-self.seen_V[often], -rate_V[often]))][:top]
        return {
            "label": label,
            "tokens": self.tokens,
            "layers": {str(layer): float(self.flipped_L[l] / max(self.tokens, 1)) for l, layer in enumerate(layers)},
            "any_layer": float(self.any_layer / max(self.tokens, 1)),
            "top_tokens": [
                {
                    "token": int(t),
                    "text": decode([int(t)]) if decode else None,
                    "flip_rate": float(rate_V[t]),
                    "count": int(self.seen_V[t]),
                }
                for t in most
            ],
        }


def stability(
    models: list[MoETransformer],
    batches: Iterable[dict],
    vocab_size: int,
    sources: list[str],
    settings: Iterable[str] = tuple(SETTINGS),
    decode: Optional[Callable[[list[int]], str]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Any]:
    """Every comparison of the module docstring over `batches` (dicts of input_ids (B, S + 1), domain, valid): the
    last of `models` under each setting against itself in the reference setting, and each earlier model against it."""
    final = models[-1]
    final.eval()
    device = next(final.parameters()).device
    L = len(final.moe_layers)
    names = list(settings)
    flips = {name: Flips(L, vocab_size) for name in names}
    earlier = {f"checkpoint {source}": Flips(L, vocab_size) for source in sources[:-1]}
    tokens = 0
    for n, batch in enumerate(batches):
        keep = batch["valid"].bool()
        ids = batch["input_ids"][keep].to(device)
        if len(ids) == 0:
            continue
        inputs_BS, domain_B = ids[:, :-1], batch["domain"][keep].to(device)
        token_ids_T = inputs_BS.reshape(-1).cpu().numpy()
        reference = expert_sets(final, inputs_BS, domain_B)
        for name in names:
            flips[name].add(reference, setting_sets(name, final, inputs_BS, domain_B, seed=n), token_ids_T)
        for model, counts in zip(models[:-1], earlier.values()):
            counts.add(reference, expert_sets(model, inputs_BS, domain_B), token_ids_T)
        tokens += inputs_BS.numel()
        if progress is not None:
            progress(n + 1, tokens)
    layers = final.moe_layers
    comparisons = {name: flips[name].summary(SETTINGS[name], layers, decode) for name in names}
    comparisons.update({name: counts.summary(name, layers, decode) for name, counts in earlier.items()})
    return {"tokens": tokens, "layers": [str(l) for l in layers], "comparisons": comparisons}


def format_stability(result: dict[str, Any]) -> str:
    """The comparisons as a table: per layer and in any layer, the share of tokens whose experts changed."""
    layers = result["layers"]
    lines = [
        f"  routing stability over {result['tokens']:,} tokens: share of tokens whose expert set changes",
        "  " + f"{'comparison':<32}" + "".join(f"{'layer ' + l:>10}" for l in layers) + f"{'any layer':>11}"
        "  flips most",
    ]
    for c in result["comparisons"].values():
        most = ", ".join(repr(t["text"]) if t["text"] is not None else str(t["token"]) for t in c["top_tokens"][:3])
        lines.append(
            "  "
            + f"{c['label'][:31]:<32}"
            + "".join(f"{c['layers'][l]:>10.2%}" for l in layers)
            + f"{c['any_layer']:>11.2%}  {most}"
        )
    return "\n".join(lines)
