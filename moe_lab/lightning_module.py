"""The LightningModule: cross-entropy + weighted router losses, AdamW, warm-up + cosine, and MoE metrics.

Routing statistics accumulate on the device every micro-batch and are read once per logging interval (one
host-device synchronisation per interval, not per layer per step), summed over data-parallel ranks and
accumulation steps, so a logged load means the same at any world size.

Logged every `trainer.log_every_n_steps` optimizer steps (averages over the steps since the last log):
    train/loss, train/aux/{name} (each aux loss the router has, unweighted, mean over MoE layers), train/lr,
    train/tokens_per_sec, train/tokens
    moe/layer{L}/expert{E}/load   fraction of layer L's routed token slots that chose expert E (sums to 1)
    moe/layer{L}/dropped_frac     fraction of layer L's token slots dropped by the capacity limit
    moe/layer{L}/imbalance        max load / mean load (1 = perfectly balanced, E = one expert takes all)
    moe/layer{L}/entropy          mean per-token entropy of the router probabilities, in nats
    moe/layer{L}/aux/{name}       each aux loss of layer L (load_balance, z_loss, and the weighted others)
Logged at every validation: val/loss, val/ppl, val/loss/{domain}.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

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
        self._reset_train_window()
        self.last_train_metrics: dict[str, float] = {}
        self.last_val_metrics: dict[str, float] = {}
        self.last_val_step = -1
        self.first_val_loss: Optional[float] = None

    def forward(self, token_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.model(token_ids_BS).logits

    # ----------------------------------------------------------------------------------------------------
    # Training

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        out = self.model(ids[:, :-1], ids[:, 1:])
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        self._accumulate(out, num_tokens=ids[:, :-1].numel())
        return loss

    def _reset_train_window(self) -> None:
        self._window: Optional[dict[str, torch.Tensor]] = None  # on-device sums over the window
        self._window_micro_batches = 0
        self._window_tokens = 0  # this rank's
        self._window_start = time.perf_counter()
        self._window_eval_seconds = 0.0

    def _accumulate(self, out, num_tokens: int) -> None:
        """Add this micro-batch's losses and routing statistics to the on-device window sums."""
        self._window_micro_batches += 1
        self._window_tokens += num_tokens
        stats = {"ce": out.loss.detach()}
        if out.moe:
            layers = [out.moe[layer] for layer in self.moe_layers]
            stats.update(
                counts_LE=torch.stack([m.tokens_per_expert_E for m in layers]),
                dropped_L=torch.stack([m.dropped_slots for m in layers]),
                entropy_L=torch.stack([m.router_entropy for m in layers]),
            )
            for name in layers[0].losses:
                stats[f"aux/{name}"] = torch.stack([m.losses[name].detach() for m in layers])
        if self._window is None:
            self._window = stats
        else:
            for key, value in stats.items():
                self._window[key] = self._window[key] + value

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if step == getattr(self, "_last_stepped", None):
            return  # still accumulating gradients
        self._last_stepped = step
        if step % self.trainer.log_every_n_steps == 0 and self._window is not None:
            metrics = self._window_metrics()
            self.last_train_metrics = metrics
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)
            self._reset_train_window()

    def _window_metrics(self) -> dict[str, float]:
        """Reduce the window over ranks, then turn sums into the logged metrics (one sync for all of them)."""
        keys = sorted(self._window)
        flat = torch.cat([self._window[k].reshape(-1).float() for k in keys])
        world = self.trainer.world_size
        if world > 1:
            flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        flat = flat.cpu()  # the one synchronisation of the window
        values, offset = {}, 0
        for k in keys:
            n = self._window[k].numel()
            values[k] = flat[offset:offset + n].view_as(self._window[k])
            offset += n
        micro = self._window_micro_batches * world  # every rank runs the same number of micro-batches
        tokens = self._window_tokens * world
        seconds = max(time.perf_counter() - self._window_start - self._window_eval_seconds, 1e-9)
        tokens_per_micro_batch = self._window_tokens / self._window_micro_batches
        metrics = {
            "train/loss": values["ce"].item() / micro,
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens_per_sec": tokens / seconds,
            "train/tokens": float(self.global_step * self.trainer.accumulate_grad_batches * world
                                  * tokens_per_micro_batch),
        }
        aux = {k: v / micro for k, v in values.items() if k.startswith("aux/")}  # per-layer means over the window
        for key, per_layer in aux.items():
            metrics[f"train/{key}"] = per_layer.mean().item()
        if "counts_LE" in values:
            slots_L = values["counts_LE"].sum(-1)
            load_LE = values["counts_LE"] / slots_L.clamp(min=1)[:, None]
            for i, layer in enumerate(self.moe_layers):
                prefix = f"moe/layer{layer}"
                for e in range(self.num_experts):
                    metrics[f"{prefix}/expert{e}/load"] = load_LE[i, e].item()
                metrics[f"{prefix}/dropped_frac"] = (values["dropped_L"][i] / slots_L[i].clamp(min=1)).item()
                metrics[f"{prefix}/imbalance"] = (load_LE[i].max() * self.num_experts).item()
                metrics[f"{prefix}/entropy"] = values["entropy_L"][i].item() / micro
                for key, per_layer in aux.items():
                    metrics[f"{prefix}/{key}"] = per_layer[i].item()
        return metrics

    # ----------------------------------------------------------------------------------------------------
    # Validation

    def on_validation_epoch_start(self) -> None:
        self._val_started = time.perf_counter()
        n = len(self.domain_names)
        self._val_sums = torch.zeros(2, n, device=self.device, dtype=torch.float64)  # loss sum, tokens

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids, domain_B = batch["input_ids"], batch["domain"]
        logits_BSV = self.model(ids[:, :-1]).logits
        targets_BS = ids[:, 1:]
        loss_BS = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), reduction="none")
        loss_B = loss_BS.view_as(targets_BS).sum(-1).double()
        self._val_sums[0].index_add_(0, domain_B, loss_B)
        self._val_sums[1].index_add_(0, domain_B, torch.full_like(loss_B, targets_BS.shape[1]))

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
        if self.trainer.state.fn == "fit":  # keep validation out of the tokens/s of the training window
            self._window_eval_seconds += time.perf_counter() - self._val_started

    # ----------------------------------------------------------------------------------------------------
    # Optimisation

    def on_before_optimizer_step(self, optimizer) -> None:
        """Aux-loss-free routers move their bias once per optimizer step, from the counts of the whole global
        batch: every micro-batch since the last step (gradient accumulation), summed over data-parallel ranks."""
        reduce = None
        if self.trainer.world_size > 1:
            def reduce(t):
                return self.trainer.strategy.reduce(t, reduce_op="sum")
        for module in self.model.modules():
            if hasattr(module, "update_bias"):
                module.update_bias(reduce)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["moe_lab_rng"] = rng
        checkpoint["moe_lab_first_val_loss"] = self.first_val_loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
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
