"""The LightningModule: cross-entropy + weighted router losses, AdamW, warm-up + cosine, validation per domain.

Training metrics (losses, throughput, expert load and specialisation) are aggregated and logged by
`moe_lab.training.metrics.RoutingMetrics` from the statistics `training_step` returns. Logged at every validation:
val/loss, val/ppl, val/loss/{domain} and val/loss_se (the held-out set's own standard error). Distributed concerns
(expert parallelism, its gradients, clipping and checkpoints) belong to `moe_lab.training.strategy.MoEDDPStrategy`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from moe_lab.analysis.trace import RoutingTrace
from moe_lab.errors import CheckpointError, Diverged
from moe_lab.model import ModelConfig, MoETransformer
from moe_lab.model.experts import experts_on_meta as on_meta
from moe_lab.training.routing_replay import tape_from_trace
from moe_lab.training.schemas import OptimConfig
from moe_lab.training.strategy import MoEDDPStrategy, clip_grad_norm_


class MoELanguageModel(L.LightningModule):
    # The model's forward as training calls it (the model itself, or torch.compile of it), kept off the module tree.
    training_forward: Callable[..., Any]

    def __init__(
        self,
        model: ModelConfig | dict,
        optim: OptimConfig | dict,
        domain_names: Optional[list[str]] = None,
        tokenizer: Optional[dict] = None,
        seed: int = 0,
        experts_on_meta: bool = False,
    ):
        """`experts_on_meta`: build the expert banks without weights, for the expert-parallel strategy to
        materialise each rank's share (moe_lab/model/experts.py); every other part is built as usual."""
        super().__init__()
        self.seed = seed
        self.model_cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
        self.optim_cfg = optim if isinstance(optim, OptimConfig) else OptimConfig(**optim)
        self.domain_names = list(domain_names or ["all"])
        # Plain data only, so a checkpoint loads with torch.load(weights_only=True) and holds no pickled objects.
        self.save_hyperparameters(
            {
                "model": dataclasses.asdict(self.model_cfg),
                "optim": dataclasses.asdict(self.optim_cfg),
                "domain_names": self.domain_names,
                "tokenizer": dict(tokenizer or {}),
                "seed": seed,
            }
        )
        with on_meta() if experts_on_meta else contextlib.nullcontext():
            self.model = MoETransformer(self.model_cfg)
        # Under expert parallelism, the weights the run starts from, for the strategy to load once each rank holds
        # its experts: (read(layout) -> state dict, where they come from).
        self.starting_weights: Optional[tuple[Callable[[Any], dict], str]] = None
        for name, p in self.named_parameters():  # fine-tuning: frozen parts never get a gradient
            if part_of(name) in self.optim_cfg.freeze:
                p.requires_grad_(False)
        self.moe_layers = self.model.moe_layers
        self.num_experts = self.model_cfg.moe.num_experts
        # compile=true makes it torch.compile(self.model); set as a plain attribute, never a submodule (no second copy
        # of the weights in the state dict).
        object.__setattr__(self, "training_forward", self.model)
        self.last_train_metrics: dict[str, float] = {}  # set by metrics.RoutingMetrics at every log step
        self.last_val_metrics: dict[str, float] = {}
        self.last_val_step = -1
        self.first_val_loss: Optional[float] = None
        # Where the run came from, saved in every checkpoint so that resuming needs only ckpt_path: the command
        # line's overrides and the run directory (set by training/train.py).
        self.provenance: dict[str, Any] = {}
        self.checkpoint_step: Optional[int] = None  # the step of the checkpoint it was loaded from (load_model)
        # Micro-batches whose loss was NaN or infinite, counted on the device (no sync per step); read where a sync
        # happens anyway: every log step (RoutingMetrics) and every checkpoint save (on_save_checkpoint).
        self.nonfinite_losses: Optional[torch.Tensor] = None
        # routing.replay: the trace training micro-batches take their experts from (set by training/train.py).
        self.routing_trace: Optional[RoutingTrace] = None

    def forward(self, token_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.model(token_ids_BS).logits

    def compile_training_forward(self) -> None:
        """`compile=true`: the training forward (and its backward) through torch.compile (inductor; on a CPU it needs
        a C++ compiler). Validation, generation and checkpoints use the eager model, whose weights it shares."""
        object.__setattr__(self, "training_forward", torch.compile(self.model))

    # ----------------------------------------------------------------------------------------------------
    # Training

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        ids = batch["input_ids"]
        key = batch.get("micro_batch", batch_idx)
        with self.micro_batch_rng(batch.get("micro_batch")), self.replayed_routing(ids[:, :-1], key) as forward:
            out = forward(ids[:, :-1], ids[:, 1:], domain_B=batch.get("domain"))
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        if out.mtp_loss is not None:  # multi-token prediction (model.mtp_depth)
            loss = loss + out.mtp_loss
        bad = (~torch.isfinite(loss.detach())).float()
        self.nonfinite_losses = bad if self.nonfinite_losses is None else self.nonfinite_losses + bad
        # Routing statistics for `RoutingMetrics`, detached and still on the device (no sync here).
        stats = {"ce": out.loss.detach(), "nonfinite": bad, "moe": out.moe}
        if out.mtp_losses:
            stats["mtp_D"] = torch.stack(out.mtp_losses).detach()
        return {"loss": loss, "stats": stats}

    @contextlib.contextmanager
    def replayed_routing(self, inputs_BS: torch.Tensor, key: Any) -> Iterator[Callable[..., Any]]:
        """The training forward; under routing.replay the eager model routing as the trace recorded these
        sequences (routing_replay.py), keyed by this micro-batch."""
        if self.routing_trace is None:
            yield self.training_forward
            return
        tape = tape_from_trace(self.routing_trace, inputs_BS, self.model, key)
        with self.model.replay_routing(tape):
            yield self.model

    @contextlib.contextmanager
    def micro_batch_rng(self, index: Optional[int]) -> Iterator[None]:
        """Routers that draw noise in training (noisy top-k, Switch jitter) draw it from a generator seeded by (seed,
        the micro-batch's place in the data stream): the same micro-batch gets the same noise whichever rank or
        accumulation step computes it, so the noise never depends on the parallel layout (and two ranks never draw
        the same noise). The process's own random stream is left as it was."""
        if index is None or not self.model.stochastic_routing:
            yield
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, int(index)]).generate_state(1)[0]))
            yield

    # ----------------------------------------------------------------------------------------------------
    # Validation

    def on_validation_epoch_start(self) -> None:
        n = len(self.domain_names)
        self._val_sums = torch.zeros(2, n, device=self.device, dtype=torch.float64)  # loss sum, tokens
        # Blocks, and the sum and sum of squares of each block's mean loss: the held-out set's own standard error.
        self._val_blocks = torch.zeros(3, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict, batch_idx: int) -> Any:
        ids, domain_B = batch["input_ids"], batch["domain"]
        out = self.model(ids[:, :-1], domain_B=domain_B)
        logits_BSV = out.logits
        targets_BS = ids[:, 1:]
        loss_BS = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), reduction="none")
        valid_B = batch["valid"].double() if "valid" in batch else torch.ones_like(domain_B, dtype=torch.float64)
        loss_B = loss_BS.view_as(targets_BS).sum(-1).double() * valid_B  # padding blocks count for nothing
        self._val_sums[0].index_add_(0, domain_B, loss_B)
        self._val_sums[1].index_add_(0, domain_B, valid_B * targets_BS.shape[1])
        block_mean_B = loss_B / targets_BS.shape[1]
        self._val_blocks += torch.stack([valid_B.sum(), block_mean_B.sum(), (block_mean_B.square() * valid_B).sum()])
        return out  # its routing statistics, for callbacks (routing_analysis.RoutingAnalysis)

    def on_validation_epoch_end(self) -> None:
        sums, blocks = self._val_sums, self._val_blocks
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            blocks = self.trainer.strategy.reduce(blocks, reduce_op="sum")
        sums = sums.cpu()
        loss = (sums[0].sum() / sums[1].sum().clamp(min=1)).item()
        if not math.isfinite(loss):
            raise Diverged(f"training diverged: val/loss is {loss} at step {self.global_step}")
        metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/loss_se": held_out_se(blocks.cpu())}
        for i, name in enumerate(self.domain_names):
            if sums[1, i] > 0:
                metrics[f"val/loss/{name}"] = (sums[0, i] / sums[1, i]).item()
        # Straight to the loggers at the optimizer step just taken (Lightning's own step lags one batch behind
        # inside fit); self.log keeps val/loss in callback_metrics for checkpoint monitors.
        self.log_dict(metrics, logger=False, sync_dist=False)  # already reduced
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        self.last_val_metrics = metrics
        self.last_val_step = self.global_step
        if self.first_val_loss is None:
            self.first_val_loss = loss

    # ----------------------------------------------------------------------------------------------------
    # Optimisation

    def on_before_optimizer_step(self, optimizer) -> None:
        """Aux-loss-free routers move their bias once per optimizer step, from the counts of the whole global batch:
        every micro-batch since the last step (gradient accumulation), summed over all ranks."""

        def reduce(t: torch.Tensor) -> torch.Tensor:
            return self.trainer.strategy.reduce(t, reduce_op="sum")

        self.model.after_optimizer_step(reduce if self.trainer.world_size > 1 else None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the norm of the whole model, computed the same way at any layout (expert shards included)."""
        if not gradient_clip_val or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        strategy = self.trainer.strategy
        groups = strategy.groups if isinstance(strategy, MoEDDPStrategy) else None
        clip_grad_norm_(self, gradient_clip_val, groups.ep_group if groups is not None else None)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups: weight decay on matrices only (nanoGPT), and one group per learning-rate
        multiplier (optim.lr_mult); frozen parts (optim.freeze) are in none. Each group records its `lr_mult`."""
        groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                mult = float(self.optim_cfg.lr_mult.get(part_of(name), 1.0))
                groups.setdefault((p.ndim >= 2, mult), []).append(p)
        ordered = sorted(groups, key=lambda key: (key[1] != 1.0, not key[0], key[1]))  # the base group first
        return [
            {
                "params": groups[key],
                "weight_decay": self.optim_cfg.weight_decay if key[0] else 0.0,
                "lr": self.optim_cfg.lr * key[1],
                "lr_mult": key[1],
            }
            for key in ordered
        ]

    def parts(self) -> dict[str, dict[str, Any]]:
        """Parameters per part of the model, and whether each trains and at what learning-rate multiplier."""
        out: dict[str, dict[str, Any]] = {}
        for name, p in self.named_parameters():
            part = out.setdefault(
                part_of(name),
                {"params": 0, "frozen": False, "lr_mult": float(self.optim_cfg.lr_mult.get(part_of(name), 1.0))},
            )
            part["params"] += p.numel()
            part["frozen"] = part_of(name) in self.optim_cfg.freeze
        return out

    def configure_optimizers(self):
        cfg = self.optim_cfg
        groups = self.parameter_groups()
        fused = cfg.fused if cfg.fused is not None else self.device.type == "cuda"
        kinds = {isinstance(p, DTensor) for group in groups for p in group["params"]}
        # trainer=fsdp: FSDP's shards (DTensors) beside plain expert weights in one group, which neither the fused
        # nor the foreach step takes; groups are kept as they are so that optimizer states load under any layout.
        mixed = {"fused": False, "foreach": False} if len(kinds) > 1 else {"fused": fused}
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **mixed)
        total = max(self.trainer.max_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, total, cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------------------
    # Checkpoints: random-number state travels with the weights, so a resumed run draws the same numbers.

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.refuse_nonfinite_weights()
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["moe_lab_rng"] = rng
        checkpoint["moe_lab_first_val_loss"] = self.first_val_loss
        checkpoint["moe_lab_run"] = dict(self.provenance)

    def load_weights(self, state: dict[str, Any], source: str) -> None:
        """Put the weights the run starts from (`state`, named as this module's state dict) into it."""
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError) as e:
            reason = str(e).splitlines()[0]
            raise CheckpointError(f"{source}: its weights do not fit its model settings ({reason})") from None

    def refuse_nonfinite_weights(self) -> None:
        """Diverged (on every rank alike) if a training loss since the start was NaN or infinite or a weight is: a
        checkpoint with such weights is never written, so the last one on disk stays the last good one."""
        bad = torch.zeros((), device=self.device)
        if self.nonfinite_losses is not None:
            bad = bad + self.nonfinite_losses
        for p in self.parameters():  # a shard (trainer=fsdp) is checked here and the others on their ranks
            local = p.to_local() if isinstance(p, DTensor) else p
            local = local.detach()
            bad = bad + (~torch.isfinite(local)).any().float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() > 0:
            raise Diverged(f"training diverged by step {self.global_step}: a loss or a weight became NaN or infinite")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("moe_lab_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.first_val_loss = checkpoint.get("moe_lab_first_val_loss")


def part_of(name: str) -> str:
    """The part of the model (one of schemas.PARTS) a parameter, named as in named_parameters(), belongs to."""
    name = name.removeprefix("model.")
    if name.startswith("embed."):
        return "embeddings"
    if name.startswith("lm_head."):
        return "head"
    if name.startswith("mtp."):
        return "mtp"  # the multi-token prediction modules, whole (model.mtp_depth)
    if ".attn." in name:
        return "attention"  # the q/k norms included
    if name.endswith("norm.weight"):
        return "norms"
    if ".ffn.router." in name:
        return "router"
    if ".ffn.experts." in name:
        return "experts"
    if ".ffn.shared" in name:
        return "shared_experts"  # and their gate
    return "dense_ffn"


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def held_out_se(blocks: torch.Tensor) -> float:
    """The standard error of val/loss as an estimate over held-out text like this (blocks as the sampling unit:
    the sample standard deviation of the blocks' mean losses over sqrt(blocks)), from (count, sum, sum of squares).
    Every run of a study is scored on the same blocks, so this bounds what the held-out set's own noise adds to a
    run's number, to set beside the spread between seeds; NaN with fewer than two blocks."""
    n, total, squares = (float(v) for v in blocks)
    if n < 2:
        return float("nan")
    variance = max(squares - total * total / n, 0.0) / (n - 1)
    return math.sqrt(variance / n)
