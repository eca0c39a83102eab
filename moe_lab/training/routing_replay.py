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
from typing import Any, Hashable, Optional

import lightning as L
import numpy as np
import torch

from moe_lab.analysis.trace import RoutingTrace, TraceWriter
from moe_lab.errors import UserError
from moe_lab.model import MoETransformer, RoutingTape, Selection


def layer_choices(model, out: Any, B: int, S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(experts, dropped, weights), each (L, B, S, K), of one forward: each token's experts, first choice first.

    A fixed top-k router lists its K choices in its own order. Any other router (expert choice, a variable number
    per token) lists each token's experts by weight, highest first, K being the most any token of the batch took
    (at least 1), padded with expert E, not dropped, weight 0: a token's expert set of any size."""
    sets = [
        token_sets(out.moe[layer], B * S, moe.num_experts, moe.top_k if moe.router.Config.fixed_top_k() else None)
        for layer, moe in zip(model.moe_layers, model.moe_modules())
    ]
    K = max(experts.shape[1] for experts, _, _ in sets)
    E = model.cfg.moe.num_experts

    def stacked(i: int, fill: int) -> np.ndarray:
        """Part i of every layer's sets, padded to K with `fill`, as (L, B, S, K)."""
        return np.stack([np.pad(s[i], ((0, 0), (0, K - s[i].shape[1])), constant_values=fill) for s in sets]).reshape(
            len(sets), B, S, K
        )

    return stacked(0, E), stacked(1, 0).astype(bool), stacked(2, 0)


def token_sets(
    stats: Any, num_tokens: int, num_experts: int, fixed_k: Optional[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(experts (T, K), dropped (T, K), weights (T, K)) of one layer's routing slots; see `layer_choices`."""
    kept = stats.slot_kept_N()
    expert_N = stats.expert_N.cpu().numpy()
    weight_N = stats.weight_N.float().cpu().numpy()
    dropped_N = np.zeros(len(expert_N), dtype=bool) if kept is None else ~kept.cpu().numpy()
    if fixed_k is not None:  # K slots per token, k-major: the view is the list
        T, K = num_tokens, fixed_k
        return tuple(a.reshape(K, T).T for a in (expert_N, dropped_N, weight_N))
    token_N = stats.token_N.cpu().numpy()
    real = expert_N < num_experts
    expert_N, weight_N, dropped_N, token_N = expert_N[real], weight_N[real], dropped_N[real], token_N[real]
    order = np.lexsort((-weight_N, token_N))  # by token, then by weight, highest first
    expert_N, weight_N, dropped_N, token_N = expert_N[order], weight_N[order], dropped_N[order], token_N[order]
    size_T = np.bincount(token_N, minlength=num_tokens)
    K = max(int(size_T.max(initial=0)), 1)
    rank_N = np.arange(len(token_N)) - np.repeat(np.cumsum(size_T) - size_T, size_T)
    experts = np.full((num_tokens, K), num_experts, dtype=np.int64)
    dropped = np.zeros((num_tokens, K), dtype=bool)
    weights = np.zeros((num_tokens, K), dtype=np.float32)
    experts[token_N, rank_N], dropped[token_N, rank_N], weights[token_N, rank_N] = expert_N, dropped_N, weight_N
    return experts, dropped, weights


def check_trace_fits(trace: RoutingTrace, model: MoETransformer, setting: str) -> None:
    """UserError unless `trace` can route every MoE layer of `model` (before any work)."""
    if not model.moe_layers:
        raise UserError(f"{setting}: the model is dense, it has no routing to replay")
    for moe in model.moe_modules():
        if not moe.router.Config.fixed_top_k():
            raise UserError(
                f"{setting}: router={moe.router.registered_name} gives no fixed top-k per token, which a Parquet "
                "trace lists (replay it in memory with MoETransformer.record_routing / replay_routing)"
            )
    top_k = {moe.layer: moe.top_k for moe in model.moe_modules()}
    trace.check_model(model.moe_layers, model.cfg.moe.num_experts, top_k, setting)


def check_recordable(model: MoETransformer) -> None:
    """UserError unless every MoE layer lists experts per token, as a trace does."""
    for moe in model.moe_modules():
        if not moe.router.Config.fixed_top_k():
            raise UserError(f"routing.record: router={moe.router.registered_name} gives no fixed top-k per token")


def tape_from_trace(
    trace: RoutingTrace, token_ids_BS: torch.Tensor, layers: list[int], micro_batch: Hashable = 0
) -> RoutingTape:
    """The recorded selections of these sequences (B, S), every layer, under the key `micro_batch`."""
    experts = trace.experts_of(token_ids_BS.cpu().numpy(), layers)
    device = token_ids_BS.device
    tokens_T = token_ids_BS.reshape(-1)
    tape = RoutingTape(micro_batch=micro_batch)
    for layer, experts_BSK in experts.items():
        expert_ids_TK = torch.from_numpy(experts_BSK.reshape(-1, experts_BSK.shape[-1])).to(device)
        tape.selections[(micro_batch, layer)] = Selection.from_token_choice(expert_ids_TK, tokens_T)
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
        self.writer = TraceWriter(self.path, pl_module.model.moe_layers, self.domain_names)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.writer is not None
        ids = batch["input_ids"]
        inputs, targets = ids[:, :-1], ids[:, 1:]
        B, S = inputs.shape
        moe = outputs["stats"]["moe"]
        experts, dropped, weights = layer_choices(pl_module.model, SimpleNamespace(moe=moe), B, S)
        domain_B = batch["domain"].cpu().numpy() if "domain" in batch else np.zeros(B, dtype=np.int64)
        self.writer.write(inputs.cpu().numpy(), targets.cpu().numpy(), domain_B, experts, dropped, weights)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            print(f"moe-lab: wrote the routing of every training micro-batch to {self.path}", flush=True)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if self.writer is not None:
            self.writer.abandon()
            self.writer = None
