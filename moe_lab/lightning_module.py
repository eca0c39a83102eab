"""The LightningModule: cross-entropy + weighted router losses, AdamW, warm-up + cosine, validation per domain.

Training metrics (losses, throughput, expert load and specialisation) are aggregated and logged by
`moe_lab.observe.RoutingMetrics` from the statistics `training_step` returns. Logged at every validation:
val/loss, val/ppl, val/loss/{domain}.
"""

from __future__ import annotations

import math
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F

from moe_lab.config import OptimConfig, model_config
from moe_lab.model import MoETransformer


class MoELanguageModel(L.LightningModule):
    def __init__(self, model: dict, optim: dict, domain_names: Optional[list[str]] = None,
                 tokenizer: Optional[dict] = None):
        super().__init__()
        # Plain dicts only: checkpoints then load without pickled objects (lightning-hydra-template's pitfall).
        self.save_hyperparameters()
        self.model_cfg = model_config(model)
        self.optim_cfg = OptimConfig(**optim)
        self.domain_names = list(domain_names or ["all"])
        self.model = MoETransformer(self.model_cfg)
        self.moe_layers = self.model.moe_layers
        self.num_experts = self.model_cfg.moe.num_experts
        self.last_train_metrics: dict[str, float] = {}  # set by observe.RoutingMetrics at every log step
        self.last_val_metrics: dict[str, float] = {}
        self.last_val_step = -1
        self.first_val_loss: Optional[float] = None

    def forward(self, token_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.model(token_ids_BS).logits

    # ----------------------------------------------------------------------------------------------------
    # Expert parallelism (moe_lab/parallel.py): shards, gradients, clipping and checkpoints

    @property
    def ep_groups(self):
        return next((b.ffn.ep for b in self.model.blocks if b.is_moe and b.ffn.ep is not None), None)

    def setup(self, stage: str) -> None:
        """After torch.distributed is up and before DDP and the optimizer exist: keep this rank's experts."""
        ep_size = self.model_cfg.moe.expert_parallel
        if ep_size > 1 and self.ep_groups is None:
            from moe_lab.parallel import expert_parameter_names, init_expert_parallel

            groups = init_expert_parallel(ep_size)
            for block in self.model.blocks:
                if block.is_moe:
                    block.ffn.shard_experts(groups)
            # Outside fit, Lightning broadcasts rank 0's parameters to every rank: not the expert shards.
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self, expert_parameter_names(self))

    def _expert_shards(self) -> list[tuple[torch.nn.Parameter, torch.nn.Module]]:
        """(parameter, its GroupedExperts) for every expert weight held as a shard."""
        return [(p, b.ffn.experts) for b in self.model.blocks if b.is_moe and b.ffn.ep is not None
                for p in (b.ffn.experts.w_in_EGFD, b.ffn.experts.w_out_EDF)]

    def _expert_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p, _ in self._expert_shards()]

    def _reduce_expert_gradients(self) -> None:
        """DDP averages the other gradients over all W ranks; an expert's gradient here already holds the sum over
        its EP group's tokens (the all-to-all's backward brought it home), so sum it over the ranks holding the same
        expert and divide by W: the same mean-over-ranks loss as DDP's."""
        groups = self.ep_groups
        for p in self._expert_parameters():
            if p.grad is not None:
                if groups.edp_size > 1:
                    torch.distributed.all_reduce(p.grad, group=groups.edp_group)
                p.grad.div_(groups.world_size)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        groups = self.ep_groups
        if groups is None or not gradient_clip_val or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # The norm of the whole model: dense gradients are the same on every rank, expert shards are summed over
        # the EP group, so every rank computes the same norm and scales the same way.
        experts = {id(p) for p in self._expert_parameters()}
        with_grad = [p for p in self.parameters() if p.grad is not None]
        zero = torch.zeros((), device=self.device)
        dense_sq = sum((p.grad.float().square().sum() for p in with_grad if id(p) not in experts), zero)
        expert_sq = sum((p.grad.float().square().sum() for p in with_grad if id(p) in experts), zero)
        torch.distributed.all_reduce(expert_sq, group=groups.ep_group)
        total = (dense_sq + expert_sq).sqrt()
        scale = torch.clamp(gradient_clip_val / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for p in with_grad:
            p.grad.mul_(scale)

    # ----------------------------------------------------------------------------------------------------
    # Training

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        ids = batch["input_ids"]
        out = self.model(ids[:, :-1], ids[:, 1:])
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        # Routing statistics for `observe.RoutingMetrics`, detached and still on the device (no sync here).
        return {"loss": loss, "stats": {"ce": out.loss.detach(), "moe": out.moe}}

    # ----------------------------------------------------------------------------------------------------
    # Validation

    def on_validation_epoch_start(self) -> None:
        n = len(self.domain_names)
        self._val_sums = torch.zeros(2, n, device=self.device, dtype=torch.float64)  # loss sum, tokens

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids, domain_B = batch["input_ids"], batch["domain"]
        logits_BSV = self.model(ids[:, :-1]).logits
        targets_BS = ids[:, 1:]
        loss_BS = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), reduction="none")
        valid_B = batch["valid"].double() if "valid" in batch else torch.ones_like(domain_B, dtype=torch.float64)
        loss_B = loss_BS.view_as(targets_BS).sum(-1).double() * valid_B  # padding blocks count for nothing
        self._val_sums[0].index_add_(0, domain_B, loss_B)
        self._val_sums[1].index_add_(0, domain_B, valid_B * targets_BS.shape[1])

    def on_validation_epoch_end(self) -> None:
        sums = self._val_sums
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        sums = sums.cpu()
        loss = (sums[0].sum() / sums[1].sum().clamp(min=1)).item()
        metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
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
        """Expert-parallel gradients are averaged over their expert-data-parallel group; aux-loss-free routers move
        their bias once per optimizer step, from the counts of the whole global batch: every micro-batch since the
        last step (gradient accumulation), summed over all ranks (each routes its own tokens)."""
        if self.ep_groups is not None:
            self._reduce_expert_gradients()
        reduce = None
        if self.trainer.world_size > 1:
            def reduce(t):
                return self.trainer.strategy.reduce(t, reduce_op="sum")
        for module in self.model.modules():
            if hasattr(module, "update_bias"):
                module.update_bias(reduce)

    def parameter_groups(self) -> list[list[torch.nn.Parameter]]:
        """[decay, no decay]: weight decay on matrices only (nanoGPT). The order is the optimizer's parameter order."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [[p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]]

    def configure_optimizers(self):
        cfg = self.optim_cfg
        decay, no_decay = self.parameter_groups()
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
        total = max(self.trainer.max_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, total, cfg.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------------------
    # Checkpoints: random-number state travels with the weights, so a resumed run draws the same numbers.

    def _reshard_optimizer_state(self, checkpoint: dict, gather: bool) -> None:
        """Adam's moments of expert shards: gathered to every expert when saving, this rank's kept when loading.
        The optimizer numbers its parameters group by group, in `parameter_groups()` order."""
        from moe_lab.parallel import all_gather

        slot_of = {id(p): i for i, p in enumerate(p for group in self.parameter_groups() for p in group)}
        for optimizer_state in checkpoint.get("optimizer_states", []):
            for param, experts in self._expert_shards():
                slot = slot_of[id(param)]
                if slot not in optimizer_state["state"]:
                    continue
                # A new dict: optimizer.state_dict() shares its per-parameter dicts with the live optimizer.
                state = dict(optimizer_state["state"][slot])
                for key, value in state.items():
                    if not torch.is_tensor(value) or value.ndim == 0:
                        continue  # Adam's step count
                    if gather and value.shape[0] == experts.num_experts:
                        state[key] = all_gather(value, experts.ep_group).flatten(0, 1)
                    elif not gather and value.shape[0] == experts.full_num_experts:
                        state[key] = value[experts.first_expert:experts.first_expert + experts.num_experts].clone()
                optimizer_state["state"][slot] = state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ep_groups is not None:  # a checkpoint holds every expert whatever the layout
            self._reshard_optimizer_state(checkpoint, gather=True)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["moe_lab_rng"] = rng
        checkpoint["moe_lab_first_val_loss"] = self.first_val_loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ep_groups is not None:  # model weights are sliced by GroupedExperts' load hook
            self._reshard_optimizer_state(checkpoint, gather=False)
        rng = checkpoint.get("moe_lab_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.first_val_loss = checkpoint.get("moe_lab_first_val_loss")


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
