"""`metrics.analysis_every_n_steps`: the cheap routing analyses of `moe-lab analyze` during training, on the
validation data, so the run's dashboard and loggers show them over time.

At the first validation at or after every n optimizer steps (and at step 0 and the last step), each validation batch's
routing decisions go into a `RoutingCounts` (`moe_lab/analysis/routing.py`); at the end of the validation the tables
are summed over data-parallel ranks and read. Logged (L = block index):
    analysis/layer{L}/vocab_specialisation  share of a token id's occurrences at its most frequent expert (OLMoE),
                                            frequency-weighted over ids seen 5 times or more; random routing: k/E
    analysis/layer{L}/repeat_top1           consecutive tokens with the same first choice (Mixtral), and
    analysis/layer{L}/repeat_top1_chance    the same for tokens paired at random
    analysis/layer{L}/max_coactivation      the largest P(expert j chosen | expert i chosen), i != j (OLMoE)
    analysis/vocab_specialisation, analysis/repeat_top1, analysis/repeat_top1_chance, analysis/max_coactivation
                                            their means over layers
    analysis/random_baseline                k/E (k: the mean experts per token), vocabulary specialisation under
                                            random routing
"""

from __future__ import annotations

from typing import Any, Optional, cast

import lightning as L
import numpy as np
import torch

from moe_lab.analysis.routing import RoutingCounts, coactivation, random_share, repeat_rates, vocab_specialisation
from moe_lab.errors import UserError
from moe_lab.training.module import MoELanguageModel
from moe_lab.training.routing_replay import layer_choices


def check_analysable(model) -> None:
    """UserError unless the model has MoE layers to analyse (before a run starts)."""
    if not model.moe_layers:
        raise UserError(
            "metrics.analysis_every_n_steps: the model is dense, there is no routing to analyse; leave it at 0"
        )


class RoutingAnalysis(L.Callback):
    """Counts the validation batches' routing at the validations that are due, and logs the analyses."""

    def __init__(self, every_n_steps: int, max_steps: int):
        self.every_n_steps = every_n_steps
        self.max_steps = max_steps
        self.last_step: Optional[int] = None
        self.counting = False  # this validation is analysed
        self.counts: Optional[RoutingCounts] = None

    def due(self, step: int) -> bool:
        return (
            self.last_step is None
            or step // self.every_n_steps > self.last_step // self.every_n_steps
            or step >= self.max_steps
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        self.counting, self.counts = False, None
        if not trainer.sanity_checking and self.due(step) and step != self.last_step:
            self.counting = True

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.counting or outputs is None:
            return
        keep = batch["valid"].bool() if "valid" in batch else torch.ones_like(batch["domain"], dtype=torch.bool)
        ids = batch["input_ids"]
        B, S = ids.shape[0], ids.shape[1] - 1
        model = lm(pl_module).model
        if self.counts is None:
            self.counts = RoutingCounts(
                len(model.moe_layers),
                model.cfg.moe.num_experts,
                model.moe_modules()[0].top_k,
                model.cfg.vocab_size,
                len(lm(pl_module).domain_names),
                S,
                layer_experts=model.layer_experts(),
            )
        experts, dropped, _, _ = layer_choices(lm(pl_module).model, outputs, B, S)
        keep_np = keep.cpu().numpy()
        ids_np = ids.cpu().numpy()[keep_np]
        if len(ids_np):
            self.counts.add(
                experts[:, keep_np],
                ids_np[:, :-1],
                ids_np[:, 1:],
                batch["domain"].cpu().numpy()[keep_np],
                dropped[:, keep_np],
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts, counting = self.counts, self.counting
        self.counts, self.counting = None, False
        if not counting:
            return
        if trainer.world_size > 1:  # the tables of every rank's share of the data; a rank that saw none adds zeros
            if counts is None:
                model = lm(pl_module).model
                counts = RoutingCounts(
                    len(model.moe_layers),
                    model.cfg.moe.num_experts,
                    model.moe_modules()[0].top_k,
                    model.cfg.vocab_size,
                    len(lm(pl_module).domain_names),
                    1,
                    layer_experts=model.layer_experts(),
                )
            for name in ("input_LVE", "input_V", "size_LN", "pairs_LEE", "repeat_L"):
                table = torch.from_numpy(getattr(counts, name).astype(np.int64)).to(pl_module.device)
                setattr(counts, name, trainer.strategy.reduce(table, reduce_op="sum").cpu().numpy())
            seen = torch.tensor([counts.pairs_seen], device=pl_module.device)
            counts.pairs_seen = int(trainer.strategy.reduce(seen, reduce_op="sum").item())
        if counts is None or counts.pairs_seen == 0:
            return
        metrics = analysis_metrics(counts, lm(pl_module).model.moe_layers)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.last_step = trainer.global_step


def analysis_metrics(counts: RoutingCounts, layers: list[int]) -> dict[str, float]:
    _, vocab_L, _ = vocab_specialisation(counts.input_LVE, counts.input_V, min_count=5)
    repeats = repeat_rates(counts)
    co_LEE = coactivation(counts).copy()
    for co in co_LEE:
        np.fill_diagonal(co, 0.0)
    per_layer = {
        "vocab_specialisation": np.nan_to_num(vocab_L, nan=0.0),
        "repeat_top1": repeats["top1"],
        "repeat_top1_chance": repeats["top1_chance"],
        "max_coactivation": co_LEE.max(axis=(1, 2)),
    }
    metrics: dict[str, float] = {"analysis/random_baseline": float(random_share(counts).mean())}
    for key, values in per_layer.items():
        for layer, value in zip(layers, values):
            metrics[f"analysis/layer{layer}/{key}"] = float(value)
        metrics[f"analysis/{key}"] = float(np.mean(values))
    return metrics


def lm(pl_module: L.LightningModule) -> MoELanguageModel:
    """The LightningModule as moe-lab's (the callbacks run on nothing else)."""
    return cast(MoELanguageModel, pl_module)
