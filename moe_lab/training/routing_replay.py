"""`routing.replay` and `routing.record`: training under a recorded routing, and recording a run's own.

    routing.record=FILE.parquet   every training micro-batch's routing (each token's experts, weights and drops
                                  in every MoE layer) goes to FILE, a trace as `moe-lab analyze --trace` writes
    routing.replay=FILE.parquet   every training micro-batch takes the experts FILE recorded for its sequences
                                  (found by their token ids), weighted by the live router's own scores, under the
                                  contract of moe_lab/model/replay.py; validation routes live

A second run with the same data and seed under `routing.replay=` the first run's recording trains its model under
the first model's routing as it evolved (the ablation); a trace of a fixed checkpoint (`moe-lab analyze --trace`,
on the data the run trains on) trains under that model's routing, as an RL trainer replays its sampler's.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Hashable, NamedTuple, Optional

import lightning as L
import numpy as np
import torch

from moe_lab.analysis.trace import RoutingTrace, TokenLists, TraceMismatch, TraceWriter
from moe_lab.errors import UserError
from moe_lab.model import MoETransformer, ReplayMismatch, RoutingTape, Selection


class LayerChoices(NamedTuple):
    """Each token's experts in every MoE layer of one forward, (L, B, S, K) each: see `layer_choices`."""

    experts: np.ndarray
    dropped: np.ndarray
    weights: np.ndarray
    slots: np.ndarray  # the routing slot each expert filled (a fixed top-k: 0..K-1, its order)


def layer_choices(model, out: Any, B: int, S: int) -> LayerChoices:
    """Each token's experts, first choice first, with their drops, weights and routing slots.

    A fixed top-k router lists its K choices in its own order. Any other router (expert choice, a variable number
    per token) lists each token's experts by weight, highest first, K being the most any token of the batch took
    (at least 1), padded with expert E, not dropped, weight 0: a token's expert set of any size."""
    E = model.cfg.moe.num_experts  # the most experts of any layer: the id of no expert in every layer's lists
    sets = []
    for layer, moe in zip(model.moe_layers, model.moe_modules()):
        fixed_k = moe.top_k if moe.router.Config.fixed_top_k() else None
        experts, *rest = token_sets(out.moe[layer], B * S, moe.num_experts, fixed_k)
        sets.append((np.where(experts >= moe.num_experts, E, experts), *rest))
    K = max(experts.shape[1] for experts, _, _, _ in sets)

    def stacked(i: int, fill: int) -> np.ndarray:
        """Part i of every layer's sets, padded to K with `fill`, as (L, B, S, K)."""
        return np.stack([np.pad(s[i], ((0, 0), (0, K - s[i].shape[1])), constant_values=fill) for s in sets]).reshape(
            len(sets), B, S, K
        )

    return LayerChoices(stacked(0, E), stacked(1, 0).astype(bool), stacked(2, 0), stacked(3, 0))


def token_sets(
    stats: Any, num_tokens: int, num_experts: int, fixed_k: Optional[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(experts, dropped, weights, slots), each (T, K), of one layer's routing slots; see `layer_choices`. A slot is
    the token's k-th of its router's K (token choice); under expert choice, its place among the token's experts."""
    kept = stats.slot_kept_N()
    expert_N = stats.expert_N.cpu().numpy()
    weight_N = stats.weight_N.float().cpu().numpy()
    dropped_N = np.zeros(len(expert_N), dtype=bool) if kept is None else ~kept.cpu().numpy()
    if fixed_k is not None:  # K slots per token, k-major: the view is the list
        T, K = num_tokens, fixed_k
        slots = np.broadcast_to(np.arange(K), (T, K))
        return (*(a.reshape(K, T).T for a in (expert_N, dropped_N, weight_N)), slots)
    token_N = stats.token_N.cpu().numpy()
    slot_N = np.arange(len(expert_N)) // max(num_tokens, 1)  # token choice's k-major slots
    slots_of = (expert_N, weight_N, dropped_N, token_N, slot_N)
    order = np.flatnonzero(expert_N < num_experts)  # slots that go to an expert
    order = order[np.lexsort((-weight_N[order], token_N[order]))]  # by token, then by weight, highest first
    expert_N, weight_N, dropped_N, token_N, slot_N = (a[order] for a in slots_of)
    size_T = np.bincount(token_N, minlength=num_tokens)
    K = max(int(size_T.max(initial=0)), 1)
    rank_N = np.arange(len(token_N)) - np.repeat(np.cumsum(size_T) - size_T, size_T)
    experts = np.full((num_tokens, K), num_experts, dtype=np.int64)
    dropped = np.zeros((num_tokens, K), dtype=bool)
    weights = np.zeros((num_tokens, K), dtype=np.float32)
    slots = np.zeros((num_tokens, K), dtype=np.int64)
    experts[token_N, rank_N], dropped[token_N, rank_N], weights[token_N, rank_N] = expert_N, dropped_N, weight_N
    slots[token_N, rank_N] = slot_N if stats.routing.slots_by == "token" else rank_N
    return experts, dropped, weights, slots


def listed_slots(model: MoETransformer) -> bool:
    """Whether a trace of `model` records each expert's routing slot: its tokens take a varying number of K."""
    return any(moe.router.Config.variable_k for moe in model.moe_modules())


def trace_writer(path: str | Path, model: MoETransformer, domain_names: list[str]) -> TraceWriter:
    """A trace of `model`'s routing (checked first: a dense model has none)."""
    if not model.moe_layers:
        raise UserError("the model is dense (experts=dense): it has no routing to trace")
    return TraceWriter(path, model.moe_layers, domain_names, model.cfg.moe.num_experts, listed_slots(model))


def write_choices(writer: TraceWriter, inputs_BS, targets_BS, domain_B, choices: LayerChoices) -> None:
    writer.write(
        np.asarray(inputs_BS),
        np.asarray(targets_BS),
        np.asarray(domain_B),
        choices.experts,
        choices.dropped,
        choices.weights,
        choices.slots,
    )


def expected_lists(moe: Any) -> tuple[int, int]:
    """(fewest, most) experts a token of this MoE layer takes: k and k (a fixed top-k), up to its K slots (a
    variable number), 0 to E (expert choice)."""
    if moe.router.Config.fixed_top_k():
        return moe.top_k, moe.top_k
    return 0, (moe.top_k if moe.router.token_choice else moe.num_experts)


def check_trace_fits(trace: RoutingTrace, model: MoETransformer, setting: str) -> None:
    """UserError unless `trace` can route every MoE layer of `model` (before any work)."""
    if not model.moe_layers:
        raise UserError(f"{setting}: the model is dense, it has no routing to replay")
    lists = {moe.layer: expected_lists(moe) for moe in model.moe_modules()}
    experts = {moe.layer: moe.num_experts for moe in model.moe_modules()}
    trace.check_model(model.moe_layers, experts, lists, setting)


def selection_of(lists: TokenLists, moe: Any, token_ids_T: torch.Tensor) -> Selection:
    """A layer's selection from a trace's lists, in its router's slot order: K slots per token (those a token did
    not take: no expert, id E, in the slots the trace leaves free) or, for expert choice, each expert's tokens."""
    device = token_ids_T.device
    if moe.router.token_choice:
        width = moe.top_k
        expert_ids_TK = torch.from_numpy(lists.padded(width, moe.num_experts)).to(device)
        return Selection.from_token_choice(expert_ids_TK, token_ids_T)
    tokens = np.repeat(np.arange(len(lists.lengths_R)), lists.lengths_R)
    order = np.argsort(lists.experts, kind="stable")  # expert-major, each expert's tokens in order
    expert_N, token_N = (torch.from_numpy(a[order].astype(np.int64)).to(device) for a in (lists.experts, tokens))
    return Selection(expert_N, token_N, len(lists.lengths_R), "expert", token_ids_T)


def tape_from_trace(
    trace: RoutingTrace, token_ids_BS: torch.Tensor, model: MoETransformer, micro_batch: Hashable = 0
) -> RoutingTape:
    """The recorded selections of these sequences (B, S), every MoE layer of `model`, under the key
    `micro_batch`."""
    lists = trace.experts_of(token_ids_BS.cpu().numpy(), model.moe_layers)
    tokens_T = token_ids_BS.reshape(-1)
    tape = RoutingTape(micro_batch=micro_batch)
    for moe in model.moe_modules():
        selection = selection_of(lists[moe.layer], moe, tokens_T)
        try:  # as the layer will check it, but naming the file: a user's mistake, not a bug
            selection.check(
                moe.layer, len(tokens_T), moe.num_experts, moe.top_k, moe.router.token_choice, None, skips=True
            )
        except ReplayMismatch as e:
            raise TraceMismatch(f"{trace.path}: {e}") from None
        tape.selections[(micro_batch, moe.layer)] = selection
    return tape


class RoutingRecorder(L.Callback):
    """`routing.record`: each training micro-batch's routing, appended to a trace (one process: a data-parallel
    run's ranks would each need a file of their own, which is not done)."""

    def __init__(self, path: str | Path, domain_names: list[str]):
        self.path = Path(path).expanduser()
        self.domain_names = domain_names
        self.writer: Optional[TraceWriter] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.world_size > 1:
            raise UserError("routing.record writes one trace from one process; record a single-process run")
        self.writer = trace_writer(self.path, pl_module.model, self.domain_names)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.writer is not None
        ids = batch["input_ids"]
        inputs, targets = ids[:, :-1], ids[:, 1:]
        B, S = inputs.shape
        moe = outputs["stats"]["moe"]
        choices = layer_choices(pl_module.model, SimpleNamespace(moe=moe), B, S)
        domain_B = batch["domain"].cpu().numpy() if "domain" in batch else np.zeros(B, dtype=np.int64)
        write_choices(self.writer, inputs.cpu().numpy(), targets.cpu().numpy(), domain_B, choices)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            print(f"moe-lab: wrote the routing of every training micro-batch to {self.path}", flush=True)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if self.writer is not None:
            self.writer.abandon()
            self.writer = None
