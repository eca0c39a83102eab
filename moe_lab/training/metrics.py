"""What the experts did: routing statistics per MoE layer, aggregated over a logging window, over gradient-accumulation
steps and over data-parallel ranks, logged as scalars, written to `routing.jsonl`, and drawn for W&B.

Cheap by construction: every micro-batch adds its per-layer counts to on-device sums (no host-device synchronisation);
once per logging window the sums are all-reduced and copied to the host in one transfer.

Logged every `trainer.log_every_n_steps` optimizer steps (L = block index, E = expert):
    train/loss, train/aux/{name}, train/lr, train/tokens_per_sec, train/tokens, train/mfu (GPUs in Lightning's table)
    moe/layer{L}/expert{E}/load   share of layer L's routed token slots that chose expert E (sums to 1)
    moe/layer{L}/imbalance        max load / mean load (1 = balanced; E = one expert takes all)
    moe/layer{L}/maxvio           imbalance - 1 (DeepSeek's MaxVio)
    moe/layer{L}/cv               coefficient of variation of the loads (std / mean)
    moe/layer{L}/dropped_frac     share of token slots over capacity (expert choice: tokens no expert took)
    moe/layer{L}/dead_experts     experts that got no token in the window
    moe/layer{L}/min_load         the least loaded expert's load over the fair share 1/E (0 = starving, 1 = balanced)
    moe/layer{L}/starved_experts  experts under 10% of the fair share (alive, but barely used)
    moe/layer{L}/entropy          mean per-token entropy of the router probabilities (nats); entropy_norm = / log E
    moe/layer{L}/topk_mass        mean router probability held by a token's chosen experts
    moe/layer{L}/domain_mi        mutual information between expert and data domain (nats), labelled data only
    moe/layer{L}/specialization   domain_mi / H(domain): 0 = experts ignore the domain, 1 = an expert per domain
    moe/layer{L}/aux/{name}       each aux loss of the layer
    moe/layer{L}/overridden_frac  routing.replay: share of replayed decisions the layer's own router would not have
                                  made (moe/overridden_frac: over all layers)
    moe/flops_per_token           training FLOPs per token (6 x active weights + attention, PaLM) at the experts
                                  tokens took: top-k's constant, a dynamic router's realised compute
    moe/layer{L}/experts_per_token  experts a token went to, before capacity (top-k: k; expert choice and the
                                  dynamic routers vary: top-p, null experts, ReLU routing);
                                  moe/experts_per_token over layers, and where it varies moe/experts_per_token/{domain}
                                  and each layer's distribution (0..E) in routing.jsonl (experts_per_token_hist)
    moe/max_imbalance, moe/mean_imbalance, moe/dropped_frac, moe/dead_experts, moe/starved_experts (sums),
    moe/min_load (minimum), moe/specialization                                                    over layers
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import Throughput, get_available_flops

from moe_lab.analysis.stats import load_statistics, mutual_information
from moe_lab.errors import Diverged
from moe_lab.training.module import MoELanguageModel
from moe_lab.training.runtime import shared_cores

# The compute dtype of a Lightning precision setting, for the device's peak FLOP/s.
PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}


# Dense (not the 2:4 sparsity figure) bfloat16 and float16 tensor-core peaks, FLOP/s, of the GPUs whose names
# Lightning's table misses or lists with the sparsity figure, from NVIDIA's datasheets (H100: "NVIDIA H100 Tensor Core
# GPU" datasheet; H200: the H200 datasheet of 2024-11), by the first name fragment that matches a device's name.
DENSE_16BIT_PEAKS = (
    ("h200 nvl", 835e12),
    ("h200", 989e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
)


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak FLOP/s of one device at the trainer's precision: for 16-bit training on an H100 or H200, the dense
    tensor-core figure (DENSE_16BIT_PEAKS); otherwise Lightning's table of GPUs
    (`lightning.fabric.utilities.throughput.get_available_flops`), or None where it has no figure (CPUs, unlisted
    GPUs): MFU is never computed from a guessed peak."""
    if device.type not in ("cuda", "xla"):
        return None
    dtype = PRECISION_DTYPES.get(str(precision).split("-")[0], torch.float32)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device).lower()
        for fragment, flops in DENSE_16BIT_PEAKS:
            if fragment in name:
                return flops
    return get_available_flops(device, dtype)


def model_summary(per_layer: dict[str, list[float]]) -> dict[str, float]:
    """The model's routing figures from its layers': worst and mean imbalance, mean drops, entropy and
    specialisation, total dead and starved experts, the least loaded expert's share."""
    out = {
        "moe/max_imbalance": max(per_layer["imbalance"]),
        "moe/mean_imbalance": float(np.mean(per_layer["imbalance"])),
        "moe/dropped_frac": float(np.mean(per_layer["dropped_frac"])),
        "moe/dead_experts": float(np.sum(per_layer["dead_experts"])),
        "moe/starved_experts": float(np.sum(per_layer["starved_experts"])),
        "moe/min_load": float(np.min(per_layer["min_load"])),
        "moe/entropy_norm": float(np.mean(per_layer["entropy_norm"])),
    }
    if per_layer["specialization"]:
        out["moe/specialization"] = float(np.mean(per_layer["specialization"]))
    return out


class RoutingMetrics(L.Callback):
    """Aggregates the per-micro-batch statistics that `training_step` returns, and logs them once per window
    (`trainer.log_every_n_steps`): the loss is the mean over every micro-batch of the window, the routing statistics
    (moe/*, the aux losses) are those of the logging step's micro-batches, computed then only, since on a GPU each
    costs kernel launches in every layer at every step it is computed."""

    def __init__(
        self,
        domain_names: list[str],
        flops_per_token: int,
        output_dir: Optional[Path] = None,
        image_every_n_steps: int = 100,
        routed_expert_flops: Optional[dict[int, tuple[int, float]]] = None,
    ):
        self.domain_names = list(domain_names)
        self.flops_per_token = flops_per_token
        # Per MoE layer (MoETransformer.routed_expert_flops): one expert's FLOPs per token and the experts per token
        # flops_per_token counts; where the number varies, the FLOPs of the experts taken replace them.
        self.routed_expert_flops = routed_expert_flops or {}
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.image_every_n_steps = image_every_n_steps
        self.history: list[dict] = []  # per log step: {"step", "load": (L, E)} for heatmaps over time
        self.load_rows: list[list] = []  # (step, layer, expert, load) for a W&B table
        self._peak: Optional[float] = None
        self._said_shared = False  # the warning that the machine's cores are shared (runtime.shared_cores)
        self.layer_experts: list[int] = []  # each MoE layer's number of experts, as the last logging step found them
        self.varies = False  # whether the experts per token vary (set at the start of training from the routers)
        self._window_start = 0  # the step the current window follows
        self._run_tokens, self._run_seconds = 0, 0.0  # over the whole run (validation excluded), all devices
        self._reset()

    # -- accumulation ---------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._sums: Optional[dict[str, torch.Tensor]] = None
        self._micro_batches = 0
        self._routed_micro_batches = 0  # those whose routing statistics are in the sums (a logging step's)
        self._samples = 0
        self._tokens = 0
        self._started = time.perf_counter()
        self._paused = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        routers = [layer.router for layer in lm(pl_module).model.moe_modules()]
        self.varies = any(not r.token_choice or r.Config.variable_k for r in routers)  # experts per token varies
        self._last_step = self._window_start = trainer.global_step
        self._peak = peak_flops(pl_module.device, trainer.precision)
        self._reset()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = cast(int, getattr(trainer, "log_every_n_steps"))  # noqa: B009 (a Trainer attribute its stubs lack)
        accumulating = trainer.global_step == self._last_step
        step = trainer.global_step + int(accumulating)  # the optimizer step this micro-batch is part of
        logs = step % every == 0 or step == trainer.max_steps
        if isinstance(outputs, dict) and "stats" in outputs:
            self._accumulate(outputs["stats"], batch, lm(pl_module).moe_layers, routing=logs)
        if accumulating:
            return  # still accumulating gradients
        self._last_step = trainer.global_step
        if trainer.global_step % every == 0 and self._sums is not None:
            self._log(trainer, pl_module)

    def _accumulate(self, stats: dict, batch: dict, moe_layers: list[int], routing: bool) -> None:
        """Add a micro-batch's losses to the window's sums, and with `routing` (the micro-batches of a logging step)
        its routing statistics, which only then are computed (MoELayerOutput's properties): a step that does not log
        pays for none of them."""
        ids = batch["input_ids"]
        self._micro_batches += 1
        self._samples += ids.shape[0]
        self._tokens += ids[:, :-1].numel()
        sums = {"ce": stats["ce"], "nonfinite": stats["nonfinite"]}
        if "mtp_D" in stats:  # each multi-token prediction depth's cross-entropy
            sums["mtp_D"] = stats["mtp_D"]
        layers = [stats["moe"][layer] for layer in moe_layers] if routing else []
        if layers:
            self._routed_micro_batches += 1
            # Layers may differ in their number of experts (a model pruned to a total budget): the tables are as wide
            # as the widest, and each layer's statistics read its own columns.
            self.layer_experts = [m.routing.num_experts for m in layers]
            sums["counts_LE"] = torch.stack([pad_to(m.tokens_per_expert_E, max(self.layer_experts)) for m in layers])
            sums["dropped_L"] = torch.stack([m.dropped_slots for m in layers])
            sums["entropy_L"] = torch.stack([m.router_entropy for m in layers])
            if layers[0].topk_mass is not None:
                sums["topk_mass_L"] = torch.stack([m.topk_mass for m in layers])
            if layers[0].overridden_slots is not None:  # routing.replay
                sums["overridden_L"] = torch.stack([m.overridden_slots for m in layers])
            sums.update(self._experts_per_token(layers, batch))
            for name in layers[0].losses:
                sums[f"aux/{name}"] = torch.stack([m.losses[name].detach() for m in layers])
            if "domain" in batch and len(self.domain_names) > 1:
                sums["domain_LED"] = self._domain_counts(layers, batch["domain"], ids.shape[1] - 1)
        if self._sums is None:
            self._sums = sums
        else:
            for key, value in sums.items():  # a logging step's routing statistics are new to the window's sums
                self._sums[key] = self._sums[key] + value if key in self._sums else value

    def _experts_per_token(self, layers: list, batch: dict) -> dict[str, torch.Tensor]:
        """Experts per token: the sum over tokens per layer, and where the number varies (expert choice, top-p, null
        experts, ReLU routing) its distribution (0..E experts) per layer and its sums per data domain (on the device).
        Layers may see different numbers of tokens (the multi-token prediction modules see fewer positions)."""
        k_per_layer = [m.experts_per_token_T for m in layers]
        device = k_per_layer[0].device
        out = {
            "experts_L": torch.stack([k_T.sum() for k_T in k_per_layer]),
            "tokens_L": torch.stack([k_T.new_full((), k_T.numel()) for k_T in k_per_layer]),  # filled on the device
        }
        if not self.varies:
            return out
        bins = max(m.routing.num_experts for m in layers) + 1
        out["k_hist_LK"] = torch.stack(
            [
                torch.zeros(bins, device=device).index_add_(0, k_T.long().clamp(max=bins - 1), torch.ones_like(k_T))
                for k_T in k_per_layer
            ]
        )
        if "domain" in batch and len(self.domain_names) > 1:
            D, domain_B = len(self.domain_names), batch["domain"]
            experts, tokens = [], []
            for k_T in k_per_layer:
                domain_T = domain_B.repeat_interleave(k_T.numel() // domain_B.numel())
                experts.append(torch.zeros(D, device=device).index_add_(0, domain_T, k_T))
                tokens.append(torch.zeros(D, device=device).index_add_(0, domain_T, torch.ones_like(k_T)))
            out["experts_LD"], out["tokens_LD"] = torch.stack(experts), torch.stack(tokens)
        return out

    def _domain_counts(self, layers: list, domain_B: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(L, E, domains) routing decisions per expert and data domain, counted on the device."""
        num_domains = len(self.domain_names)
        domain_T = domain_B.repeat_interleave(seq_len)
        out = []
        widest = max(m.routing.num_experts for m in layers)
        for m in layers:
            num_experts = m.routing.num_experts
            flat_N = m.expert_N * num_domains + domain_T[m.token_N]
            counts = torch.zeros((num_experts + 1) * num_domains, device=flat_N.device)  # + slots of no expert
            counts.scatter_add_(0, flat_N, torch.ones_like(flat_N, dtype=counts.dtype))
            out.append(pad_to(counts[: num_experts * num_domains], widest * num_domains))
        return torch.stack(out).view(len(layers), -1, num_domains)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(self, "_paused_at"):  # keep validation out of the training window's tokens/s
            self._paused += time.perf_counter() - self._paused_at

    # -- the logging step -------------------------------------------------------------------------------------

    def _reduce(self, trainer: L.Trainer) -> dict[str, np.ndarray]:
        sums = self._sums or {}
        keys = sorted(sums)
        flat_t = torch.cat([sums[k].reshape(-1).float() for k in keys])
        if trainer.world_size > 1:
            flat_t = trainer.strategy.reduce(flat_t, reduce_op="sum")
        flat = flat_t.cpu().numpy()  # the one synchronisation of the window
        values, offset = {}, 0
        for k in keys:
            n = sums[k].numel()
            values[k] = flat[offset : offset + n].reshape(tuple(sums[k].shape))
            offset += n
        return values

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = self._reduce(trainer)
        if not self._said_shared and pl_module.device.type == "cpu" and trainer.is_global_zero:
            crowded = shared_cores()  # said once, at the first window the machine is busier than its CPUs
            if crowded:
                print(crowded, file=sys.stderr, flush=True)
                self._said_shared = True
        step, world = trainer.global_step, trainer.world_size
        micro = self._micro_batches * world  # every rank runs the same number of micro-batches
        seconds = max(time.perf_counter() - self._started - self._paused, 1e-9)
        # Lightning's throughput arithmetic over this window (two points: its start and now), per device.
        throughput = Throughput(available_flops=self._peak, world_size=world, window_size=2)
        throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)
        throughput.update(
            time=seconds,
            batches=self._micro_batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=self._tokens * self.flops_per_token,
        )
        window = throughput.compute()
        self._run_tokens += self._tokens * world
        self._run_seconds += seconds
        metrics = {
            "train/loss": float(values["ce"]) / micro,
            "train/lr": trainer.optimizers[0].param_groups[0]["lr"]
            / trainer.optimizers[0].param_groups[0].get("lr_mult", 1.0),
            "train/tokens_per_sec": window["device/items_per_sec"] * world,
            "train/tokens": float(step * trainer.accumulate_grad_batches * world * self._tokens / self._micro_batches),
        }
        if "device/mfu" in window:
            metrics["train/mfu"] = window["device/mfu"]
        for depth, loss in enumerate(values.get("mtp_D", []), start=1):
            metrics[f"train/mtp_loss/depth{depth}"] = float(loss) / micro
        routed = max(self._routed_micro_batches * world, 1)  # the logging step's micro-batches, on every rank
        aux = {k: v / routed for k, v in values.items() if k.startswith("aux/")}
        for key, per_layer in aux.items():
            metrics[f"train/{key}"] = float(per_layer.mean())
        record = {"step": step, "domains": self.domain_names, "layers": []}
        if "counts_LE" in values:
            self._layer_metrics(lm(pl_module).moe_layers, values, aux, routed, metrics, record)
        if values["nonfinite"] > 0 or not math.isfinite(metrics["train/loss"]):
            raise Diverged(
                f"training diverged: the loss became NaN or infinite between steps {self._window_start + 1} and {step}"
            )
        lm(pl_module).last_train_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.is_global_zero and record["layers"]:
            self._write(record)
            self._draw(trainer, step)
        self._window_start = step
        self._reset()

    @property
    def run_tokens_per_sec(self) -> Optional[float]:
        """Training tokens per second over the whole run so far (all devices, validation excluded)."""
        return self._run_tokens / self._run_seconds if self._run_seconds > 0 else None

    def flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the steps since the last log step now: a run stopped between log steps keeps them in its curve."""
        if self._sums is not None and trainer.global_step > self._window_start:
            self._log(trainer, pl_module)

    def _layer_metrics(
        self, layers: list[int], values: dict, aux: dict, micro: int, metrics: dict, record: dict
    ) -> None:
        per_layer: dict[str, list[float]] = {
            "imbalance": [],
            "dropped_frac": [],
            "dead_experts": [],
            "starved_experts": [],
            "min_load": [],
            "specialization": [],
            "entropy_norm": [],
        }
        loads = []
        for i, layer in enumerate(layers):
            prefix = f"moe/layer{layer}"
            num_experts = self.layer_experts[i]
            counts_E = values["counts_LE"][i, :num_experts]
            slots = max(counts_E.sum(), 1)
            load_E = counts_E / slots
            loads.append(load_E)
            for e in range(num_experts):
                metrics[f"{prefix}/expert{e}/load"] = float(load_E[e])
            stats = load_statistics(counts_E)
            stats["dropped_frac"] = float(values["dropped_L"][i] / slots)
            stats["entropy"] = float(values["entropy_L"][i] / micro)
            stats["entropy_norm"] = stats["entropy"] / math.log(num_experts) if num_experts > 1 else 0.0
            if "topk_mass_L" in values:
                stats["topk_mass"] = float(values["topk_mass_L"][i] / micro)
            if "overridden_L" in values:  # replayed decisions the layer's own router would not have made
                stats["overridden_frac"] = float(values["overridden_L"][i] / slots)
            stats["experts_per_token"] = float(values["experts_L"][i] / max(values["tokens_L"][i], 1))
            layer_record = {"layer": layer, "load": load_E.round(6).tolist()}
            if "k_hist_LK" in values:
                layer_record["experts_per_token_hist"] = values["k_hist_LK"][i].astype(int).tolist()
            if "domain_LED" in values:
                domain_ED = values["domain_LED"][i, :num_experts]
                stats["domain_mi"], stats["specialization"] = mutual_information(domain_ED)
                layer_record["domain_counts"] = domain_ED.astype(int).tolist()
            for key, value in stats.items():
                metrics[f"{prefix}/{key}"] = value
                if key in per_layer:
                    per_layer[key].append(value)
            for key, value in aux.items():
                metrics[f"{prefix}/{key}"] = float(value[i])
            record["layers"].append(layer_record)
            self.load_rows.extend([record["step"], layer, e, float(load_E[e])] for e in range(num_experts))
        metrics.update(model_summary(per_layer))
        metrics["moe/experts_per_token"] = float(values["experts_L"].sum() / max(values["tokens_L"].sum(), 1))
        metrics["moe/flops_per_token"] = float(self.flops_per_token) + sum(
            flops * (float(values["experts_L"][i] / max(values["tokens_L"][i], 1)) - counted)
            for i, (flops, counted) in enumerate(self.routed_expert_flops.get(layer, (0, 0.0)) for layer in layers)
        )
        if "experts_LD" in values:
            for d, name in enumerate(self.domain_names):
                tokens = values["tokens_LD"][:, d].sum()
                if tokens > 0:
                    metrics[f"moe/experts_per_token/{name}"] = float(values["experts_LD"][:, d].sum() / tokens)
        if "overridden_L" in values:
            metrics["moe/overridden_frac"] = float(values["overridden_L"].sum() / max(values["counts_LE"].sum(), 1))
        widest = max(map(len, loads))
        self.history.append(
            {
                "step": record["step"],
                "layers": list(layers),
                # (L, E): a layer with fewer experts than the widest has nan (no expert) in the columns it lacks
                "load": np.stack([np.pad(l_E, (0, widest - len(l_E)), constant_values=np.nan) for l_E in loads]),
                "domain_counts": {
                    r["layer"]: np.asarray(r["domain_counts"], dtype=float)
                    for r in record["layers"]
                    if "domain_counts" in r
                },
            }
        )

    def _write(self, record: dict) -> None:
        if self.output_dir is None:
            return
        with open(self.output_dir / "routing.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _draw(self, trainer: L.Trainer, step: int) -> None:
        """Every image_every_n_steps: per layer, experts x time load heatmaps and the W&B load table."""
        wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not wandb_loggers or step % self.image_every_n_steps != 0:
            return
        self.log_wandb_media(wandb_loggers, step)

    def log_wandb_media(self, wandb_loggers: list, step: int) -> None:
        """Plotly figures (axes, labels, colour bars; interactive in W&B): each layer's expert load over the logged
        steps, and the expert x domain shares of the latest window; plus the long-format load table."""
        import wandb

        from moe_lab.analysis.figures import domain_share_figure, load_over_time_figure

        layers = self.history[-1]["layers"]
        steps = [h["step"] for h in self.history]
        loads_TLE = np.stack([h["load"] for h in self.history])
        media = {
            "moe/heatmap": wandb.Plotly(
                load_over_time_figure(layers, steps, loads_TLE, title=f"Expert load over time, up to step {step}")
            )
        }
        tables = sorted(self.history[-1]["domain_counts"].items())
        if tables and len(self.domain_names) > 1:
            media["moe/domains"] = wandb.Plotly(
                domain_share_figure(
                    tables, self.domain_names, name=f"Share of each domain's tokens per expert, step {step}"
                )
            )
        for lg in wandb_loggers:
            lg.experiment.log(
                {
                    **media,
                    "moe/load_table": wandb.Table(
                        columns=["step", "layer", "expert", "load"], data=[list(r) for r in self.load_rows]
                    ),
                },
                commit=False,
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The steps since the last log step, then the final heatmaps and table (unless just drawn)."""
        self.flush(trainer, pl_module)
        wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        drawn = self.history and self.history[-1]["step"] % self.image_every_n_steps == 0
        if wandb_loggers and self.history and trainer.is_global_zero and not drawn:
            self.log_wandb_media(wandb_loggers, trainer.global_step)


def pad_to(values: torch.Tensor, length: int) -> torch.Tensor:
    """A 1-d tensor, zeros appended up to `length`."""
    return F.pad(values, (0, length - values.numel())) if values.numel() < length else values


def lm(pl_module: L.LightningModule) -> MoELanguageModel:
    """The LightningModule as moe-lab's (the callbacks run on nothing else)."""
    return cast(MoELanguageModel, pl_module)
