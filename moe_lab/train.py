"""`moe-lab train`: a plain `train(cfg)` that tests can call, and the thin `@hydra.main` entry around it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moe_lab.callbacks import GracefulStop, StepProgressBar, StopRequested
from moe_lab.config import ConfigError, RunConfig, UserError, config_dir, model_config, validate
from moe_lab.data.datamodule import LMDataModule
from moe_lab.lightning_module import MoELanguageModel
from moe_lab.model.routers import router_is_causal
from moe_lab.observe import Diverged, RoutingMetrics
from moe_lab.runtime import retain_freed_memory

log = logging.getLogger("moe_lab")

RUN_MARKERS = ("checkpoints", "metrics.csv", "summary.json")


class JobFailed(Exception):
    """A sweep job that failed for a reason moe-lab explains (bad input, divergence): one line, no traceback."""


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def quiet_lightning() -> None:
    """Drop Lightning's advertising and known-harmless warnings from the terminal; keep everything else."""
    noise = ("💡 Tip", "TPU available", "HPU available", "`Trainer.fit` stopped")

    class DropNoise(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(noise)

    for name in ("lightning.pytorch", "lightning.fabric"):
        target = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in target.filters):
            target.addFilter(DropNoise())
        for handler in target.handlers:
            if not any(isinstance(f, DropNoise) for f in handler.filters):
                handler.addFilter(DropNoise())
    warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from.*")
    # moe-lab's DDP keeps broadcast_buffers=False on purpose (see moe_lab/parallel.py:make_ddp_strategy).
    warnings.filterwarnings("ignore", message=r".*`broadcast_buffers` is deprecated.*")
    # Validation sums are all-reduced by the module itself before they are logged.
    warnings.filterwarnings("ignore", message=r".*It is recommended to use `self.log\('val/.*sync_dist=True.*")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as `cfg` says; returns the run summary (final metrics and where things are)."""
    run = validate(cfg)
    quiet_lightning()
    retain_freed_memory()  # CPU steps reuse freed memory instead of page-faulting it back (moe_lab/runtime.py)
    output_dir = Path(run.paths.output_dir).expanduser().resolve()
    from moe_lab.cli import launched_worker

    if not launched_worker():  # data-parallel workers share the directory rank 0 made
        refuse_used_run_dir(output_dir)
    ckpt_path = check_resume(run)
    started = time.time()
    L.seed_everything(run.seed, workers=True, verbose=False)

    data = LMDataModule(run.data, run.tokenizer, run.paths.cache_dir, run.seed)
    data.prepare_data()
    data.setup("fit")  # data errors surface here, before a model or trainer exists
    model_cfg = run.model
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = math.ceil(data.vocab_size / 64) * 64  # padded for fast matmuls (nanoGPT)
    elif model_cfg.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{data.vocab_size}; set it to null to follow the tokenizer")
    module = MoELanguageModel(model=dataclasses.asdict(model_cfg), optim=dataclasses.asdict(run.optim),
                              domain_names=data.domain_names, tokenizer=dataclasses.asdict(run.tokenizer))

    ckpt_dir = output_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    stop = GracefulStop(str(last))
    periodic = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                               every_n_train_steps=run.checkpoint.every_n_steps, save_top_k=run.checkpoint.keep,
                               monitor="step", mode="max", save_last=True)
    routing = RoutingMetrics(data.domain_names, module.model.flops_per_token(run.data.seq_len), output_dir,
                             image_every_n_steps=run.metrics.image_every_n_steps)
    loggers = build_loggers(run, cfg, output_dir)
    try:
        # RoutingMetrics before the progress bar, so the bar shows the metrics of the step just logged.
        trainer = L.Trainer(**trainer_arguments(run), logger=loggers,
                            callbacks=[periodic, stop, routing, StepProgressBar()], default_root_dir=str(output_dir),
                            max_epochs=-1, check_val_every_n_epoch=None, use_distributed_sampler=False)
        ep = run.model.moe.expert_parallel
        if trainer.world_size % ep:
            raise ConfigError(f"model.moe.expert_parallel={ep} must divide the world size {trainer.world_size} "
                              "(trainer.devices x trainer.num_nodes)")
        print_header(run, module, data, output_dir)

        if ckpt_path is None:
            trainer.validate(module, datamodule=data, verbose=False)  # the untrained model's val/loss, at step 0
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        except StopRequested:
            pass  # Ctrl-C or SIGTERM: GracefulStop saved last.ckpt at the step boundary
        if stop.received is None:
            if module.last_val_step != trainer.global_step:
                trainer.validate(module, datamodule=data, verbose=False)  # every run ends with a val/loss
            trainer.save_checkpoint(last, weights_only=False)

        summary = {
            "status": "finished" if stop.received is None else "interrupted",
            "step": trainer.global_step,
            "seconds": round(time.time() - started, 1),
            **module.last_val_metrics,
            "val_step": module.last_val_step,
            "initial_val_loss": module.first_val_loss,
            # Run-level figures only; per-layer and per-expert ones are in metrics.csv and routing.jsonl.
            **{k: v for k, v in module.last_train_metrics.items() if not k.startswith("moe/layer")},
            "params": module.model.num_params(),
            "output_dir": str(output_dir),
            "checkpoint": str(last),
            "metrics_csv": str(output_dir / "metrics.csv"),
        }
        for logger in trainer.loggers:
            logger.finalize("success" if stop.received is None else "failed")
        if trainer.is_global_zero:
            save_summary(summary, output_dir)
            if run.metrics.dashboard:  # after summary.json and the flushed metrics.csv, which it reads
                summary["dashboard"] = str(write_run_dashboard(output_dir))
                save_summary(summary, output_dir)
        print_summary(summary, module)
    finally:
        finish_wandb(loggers)
    if stop.received is not None:
        raise Interrupted(stop.received)
    return summary


def trainer_arguments(run: RunConfig) -> dict:
    """The trainer config, with `strategy: ddp` made moe-lab's DDP (expert shards left out of DDP's all-reduce)."""
    args = dict(run.trainer)
    strategy = args.get("strategy")
    if isinstance(strategy, str) and strategy in ("ddp", "ddp_find_unused_parameters_true"):
        from moe_lab.parallel import make_ddp_strategy

        args["strategy"] = make_ddp_strategy(find_unused_parameters=strategy.endswith("true"))
    return args


def write_run_dashboard(output_dir: Path) -> Path:
    from moe_lab.dashboard import write_dashboard

    return write_dashboard(output_dir, output_dir / "dashboard.html")


# ----------------------------------------------------------------------------------------------------------
# Checks before any work


def refuse_used_run_dir(output_dir: Path) -> None:
    used = [m for m in RUN_MARKERS if (output_dir / m).exists()]
    if used:
        raise UserError(f"{output_dir} already holds a run ({', '.join(used)}); moe-lab never writes over one. "
                        "Choose a new directory (hydra.run.dir=...), or resume that run with "
                        f"ckpt_path={output_dir / 'checkpoints' / 'last.ckpt'} (which writes to a new directory)")


def check_resume(run: RunConfig) -> Optional[str]:
    """The checkpoint to resume from, after checking it exists and holds the same model."""
    if run.ckpt_path is None:
        return None
    path = Path(run.ckpt_path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={run.ckpt_path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise UserError(f"ckpt_path={run.ckpt_path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    saved = (ckpt.get("hyper_parameters") or {}).get("model")
    if saved is None:
        raise UserError(f"ckpt_path={run.ckpt_path} was not written by moe-lab (it has no model settings)")
    saved_cfg = dataclasses.asdict(model_config(saved))
    wanted = dataclasses.asdict(run.model)
    for layout in ("expert_parallel", "implementation"):  # how the model is laid out, not what it is
        saved_cfg["moe"].pop(layout, None)
        wanted["moe"].pop(layout, None)
    if wanted.get("vocab_size") is None:
        wanted["vocab_size"] = saved_cfg.get("vocab_size")
    differences = _differences(saved_cfg, wanted, "model")
    if differences:
        raise UserError("the checkpoint's model differs from the configured one: " + "; ".join(differences[:5])
                        + ". Resume with the overrides of the original run (see its .hydra/overrides.yaml)")
    return str(path)


def _differences(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    return [] if a == b else [f"{prefix} is {a!r} in the checkpoint but {b!r} here"]


# ----------------------------------------------------------------------------------------------------------
# Loggers


def run_name(run: RunConfig) -> str:
    if run.run_name:
        return run.run_name
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(NOT_IN_NAME)]
    except ValueError:  # not inside a Hydra job
        overrides = []
    name = ",".join(overrides) or "defaults"
    return name if len(name) <= 128 else name[:125] + "..."


# Overrides that change where and how a run is recorded, not the experiment: left out of run names.
NOT_IN_NAME = ("hydra.", "paths.", "logger", "trainer.", "metrics.", "checkpoint.", "run_name")


def sweep_group() -> Optional[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if hc.mode.name == "MULTIRUN":
            return Path(hc.sweep.dir).name
    except ValueError:
        pass
    return None


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        return path.exists() and netrc.netrc(str(path)).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def build_loggers(run: RunConfig, cfg: DictConfig, output_dir: Path) -> list:
    loggers = []
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    resolved.pop("hydra", None)
    for node in run.logger.values():
        node = dict(node)
        target = node["_target_"]
        if target.endswith("TensorBoardLogger"):
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise UserError("logger=tensorboard needs the tensorboard package: pip install 'moe-lab[tensorboard]'"
                                ) from None
        logger = (build_wandb_logger(node, run, output_dir) if target.endswith("WandbLogger")
                  else hydra.utils.instantiate(node))
        if not target.endswith("CSVLogger"):
            logger.log_hyperparams(resolved)  # the resolved Hydra config is the run config
        loggers.append(logger)
    return loggers


def build_wandb_logger(node: dict, run: RunConfig, output_dir: Path):
    """A WandbLogger named after the overrides and grouped by sweep. Without credentials, or when the server cannot
    be reached, it logs offline (said once); a run never fails for W&B's sake."""
    node = {**node, "name": node.get("name") or run_name(run), "group": node.get("group") or sweep_group()}
    where = output_dir / "wandb"
    offline_note = f"logging offline to {where}; upload later with `wandb sync {where}/offline-run-*`"
    online = not node.get("offline") and os.environ.get("WANDB_MODE") not in ("offline", "disabled")
    if online and not wandb_has_credentials():
        rank_zero_only(print)(f"moe-lab: W&B has no credentials (WANDB_API_KEY or ~/.netrc): {offline_note}",
                              file=sys.stderr)
        node["offline"], node["mode"], online = True, "offline", False
    logger = hydra.utils.instantiate(node)
    if online:
        try:
            logger.experiment  # noqa: B018 - starts the run now, so a dead network shows here, not mid-training
        except Exception as e:  # wandb.errors.CommError and kin
            import wandb

            if wandb.run is not None:  # a half-started run
                wandb.finish(exit_code=1)
            reason = str(e).splitlines()[0][:200]
            rank_zero_only(print)(f"moe-lab: W&B could not reach its server ({reason}): {offline_note}",
                                  file=sys.stderr)
            # mode= reaches wandb.init directly: the WANDB_MODE that offline=True sets is ignored by then.
            logger = hydra.utils.instantiate({**node, "offline": True, "mode": "offline"})
    return logger


def finish_wandb(loggers: list) -> None:
    """Close the W&B run, so the next job of a sweep starts a run of its own (lightning-hydra-template issue 289)."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


# ----------------------------------------------------------------------------------------------------------
# Printing


@rank_zero_only
def print_header(run: RunConfig, module: MoELanguageModel, data: LMDataModule, output_dir: Path) -> None:
    p = module.model.num_params()
    moe = run.model.moe
    kind = (f"MoE {moe.num_experts} experts, top-{moe.router['top_k']} ({moe.router['name']}), "
            f"capacity {moe.capacity_factor or 'dropless'}, layers {module.moe_layers}" if moe.enabled else "dense")
    print(f"moe-lab: model {run.model.name}: {p['total'] / 1e6:.2f}M parameters, {p['active'] / 1e6:.2f}M active "
          f"per token; {kind}", flush=True)
    if moe.enabled and not all(router_is_causal(module.model.blocks[layer].ffn.router) for layer in module.moe_layers):
        print(f"moe-lab: warning: router={moe.router['name']} is not causal (experts choose among all positions): "
              "the model sees later tokens through routing, so its val/loss is optimistic. "
              "router=expert_choice_causal is the causal variant", file=sys.stderr, flush=True)
    train = "streamed" if data.train_blocks is None else str(len(data.train_blocks))
    print(f"moe-lab: data {run.data.source}: {train} train / {len(data.val_blocks)} val blocks of {run.data.seq_len} "
          f"tokens, domains {data.domain_names}; run directory {output_dir}", flush=True)


def save_summary(summary: dict, output_dir: Path) -> None:
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


@rank_zero_only
def print_summary(summary: dict, module: MoELanguageModel) -> None:
    m = module.last_train_metrics
    lines = [f"\nmoe-lab: run {summary['status']} at step {summary['step']} in {summary['seconds']:.0f}s"]
    if "val/loss" in summary:
        first = summary.get("initial_val_loss")
        start = f"; untrained {first:.4f}" if first is not None else ""
        lines.append(f"  val/loss    {summary['val/loss']:.4f} (step {summary['val_step']}{start})   "
                     f"val/ppl {summary['val/ppl']:.2f}")
    if "train/loss" in m:
        lines.append(f"  train/loss  {m['train/loss']:.4f}   tokens/s {m['train/tokens_per_sec']:.0f}")
    if module.moe_layers and f"moe/layer{module.moe_layers[0]}/imbalance" in m:
        special = f"moe/layer{module.moe_layers[0]}/specialization" in m
        lines.append("  layer  imbalance  dropped  dead  entropy/logE" + ("  specialization" if special else "")
                     + "  busiest expert")
        for layer in module.moe_layers:
            p = f"moe/layer{layer}/"
            loads = [m[f"{p}expert{e}/load"] for e in range(module.num_experts)]
            top = max(range(len(loads)), key=loads.__getitem__)
            lines.append(f"  {layer:>5}  {m[p + 'imbalance']:>9.2f}  {m[p + 'dropped_frac']:>7.1%}  "
                         f"{m[p + 'dead_experts']:>4.0f}  {m[p + 'entropy_norm']:>12.3f}"
                         + (f"  {m[p + 'specialization']:>14.3f}" if special else "")
                         + f"  #{top} ({loads[top]:.1%})")
    if "dashboard" in summary:
        lines.append(f"  dashboard   {summary['dashboard']}")
    lines.append(f"  checkpoint  {summary['checkpoint']}")
    lines.append(f"  metrics     {summary['metrics_csv']}")
    lines.append(f"  resume      moe-lab train ckpt_path={summary['checkpoint']}")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------------------
# The Hydra entry


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    """Returns the final validation loss, the value Hydra sweepers minimise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = train(cfg)
    except (UserError, Diverged) as e:
        if sweeping:  # a failed job: the sweeper carries on or stops (Optuna: max_failure_rate)
            log.error("moe-lab: job failed: %s", e)
            raise JobFailed(str(e)) from None
        print(f"moe-lab: error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, UserError) else 1) from None
    except Interrupted as e:
        raise SystemExit(128 + e.signum) from None
    return summary.get("val/loss")
