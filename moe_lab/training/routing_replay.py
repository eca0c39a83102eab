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
    """(experts, dropped, weights), each (L, B, S, K), of one forward of a token-choice model: each token's top-k,
    first choice first."""
    experts, dropped, weights = [], [], []
    for layer, moe in zip(model.moe_layers, model.moe_modules()):
        stats = out.moe[layer]
        K = moe.top_k
        experts.append(stats.per_token(stats.expert_N, K).reshape(B, S, K).cpu().numpy())
        weights.append(stats.per_token(stats.weight_N.float(), K).reshape(B, S, K).cpu().numpy())
        kept = stats.slot_kept_N()
        dropped.append(
            np.zeros((B, S, K), dtype=bool)
            if kept is None
            else stats.per_token(~kept, K).reshape(B, S, K).cpu().numpy()
        )
    return np.stack(experts), np.stack(dropped), np.stack(weights)


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
