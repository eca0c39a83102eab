"""The run's story, told to the person and the files: the header a run starts with, the end-of-run table, and the
records (summary.json, resumed_from.json), for a run that finished and for one that ended early."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from moe_lab.analysis.runs import RESUMED_FROM
from moe_lab.errors import DiskFull, Diverged
from moe_lab.files import write_atomically
from moe_lab.training.callbacks import AbortRequested, GracefulStop
from moe_lab.training.checkpoint import checkpoint_origin, saved
from moe_lab.training.module import MoELanguageModel
from moe_lab.training.provenance import describe_code, run_provenance
from moe_lab.training.run_dir import launched_worker
from moe_lab.training.runtime import oversubscription
from moe_lab.training.schemas import TrainConfig

if TYPE_CHECKING:
    from moe_lab.data.datamodule import LMDataModule
    from moe_lab.training.metrics import RoutingMetrics


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint; the process exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# ----------------------------------------------------------------------------------------------------------
# The terminal


def produced_by(run: TrainConfig) -> dict[str, Any]:
    """The code version, packages, machine and precision of this run (training/provenance.py)."""
    trainer = run.trainer
    accelerator, precision = str(trainer.get("accelerator")), str(trainer.get("precision"))
    record = run_provenance(accelerator, trainer.get("devices", 1), precision, torch.get_num_threads())
    record["compile"] = bool(run.compile)
    return record


@rank_zero_only
def print_header(
    run: TrainConfig, module: MoELanguageModel, data: "LMDataModule", output_dir: Path, chosen: list[str]
) -> None:
    p = module.model.num_params()
    moe = run.model.moe
    kind = (
        f"MoE {moe.num_experts} experts, top-{moe.router.top_k} ({moe.router.name}), "
        f"capacity {moe.capacity_factor or 'dropless'}, layers {module.moe_layers}"
        if moe.enabled
        else "dense"
    )
    print(
        f"moe-lab: model {run.model.name}: {p['total'] / 1e6:.2f}M parameters, {p['active'] / 1e6:.2f}M active "
        f"per token; {kind}",
        flush=True,
    )
    how = f"{device_description(run.trainer)}, {'compiled (torch.compile)' if run.compile else 'eager'}"
    print(f"moe-lab: {how}" + (f" (auto: {'; '.join(chosen)})" if chosen else ""), flush=True)
    crowded = oversubscription(run.trainer)
    if crowded:
        print(crowded, file=sys.stderr, flush=True)
    record = module.provenance["produced_by"]
    versions = ", ".join(f"{k} {v}" for k, v in record["packages"].items() if k in ("torch", "lightning") and v)
    print(f"moe-lab: code {describe_code(record['code'])}; {versions}; {record['machine']['cpu']}", flush=True)
    if moe.enabled and not all(layer.router.causal for layer in module.model.moe_modules()):
        print(
            f"moe-lab: warning: router={moe.router.name} is not causal (experts choose among all positions): "
            "the model sees later tokens through routing, so its val/loss is optimistic. "
            "router=expert_choice_causal is the causal variant",
            file=sys.stderr,
            flush=True,
        )
    parts = module.parts()
    frozen = [f"{name} ({part['params'] / 1e6:.2f}M)" for name, part in parts.items() if part["frozen"]]
    scaled = [
        f"{name} x{part['lr_mult']:g}" for name, part in parts.items() if part["lr_mult"] != 1.0 and not part["frozen"]
    ]
    if frozen or scaled:
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(
            f"moe-lab: fine-tuning {trainable / 1e6:.2f}M of {p['total'] / 1e6:.2f}M parameters; frozen: "
            f"{', '.join(frozen) or 'none'}; learning rate: {', '.join(scaled) or 'x1 everywhere'}",
            flush=True,
        )
    train = "streamed" if data.train_blocks is None else str(len(data.train_blocks))
    val = len(data.val_blocks) if data.val_blocks is not None else 0
    print(
        f"moe-lab: data {run.data.source}: {train} train / {val} val blocks of {run.data.seq_len} "
        f"tokens, domains {data.domain_names}; run directory {output_dir}",
        flush=True,
    )


def device_description(trainer: dict) -> str:
    """Where and in which precision the run computes, as its header says it: e.g. `cpu x 1, 32-true, deterministic`."""
    devices = trainer.get("devices", 1)
    nodes = trainer.get("num_nodes", 1)
    where = f"{trainer.get('accelerator', 'cpu')} x {devices}" + (f" x {nodes} nodes" if nodes and nodes > 1 else "")
    precision = str(trainer.get("precision", "32-true"))
    if precision == "bf16-mixed" and trainer.get("accelerator", "cpu") == "cpu":
        precision += " (bfloat16 compute, float32 weights; trainer.precision=32-true for float32)"
    return f"{where}, {precision}" + (", deterministic" if trainer.get("deterministic") else "")


def save_summary(summary: dict, output_dir: Path) -> None:
    """summary.json, always valid JSON (NaN and infinities become null), written atomically."""
    write_atomically(
        output_dir / "summary.json", json.dumps(_finite(summary), indent=2, default=str, allow_nan=False) + "\n"
    )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@rank_zero_only
def print_summary(summary: dict, module: MoELanguageModel) -> None:
    m = module.last_train_metrics
    lines = [f"\nmoe-lab: run {summary['status']} at step {summary['step']} in {summary['seconds']:.0f}s"]
    if "val/loss" in summary:
        first = summary.get("initial_val_loss")
        start = f"; at step 0 {first:.4f}" if first is not None else ""
        lines.append(
            f"  val/loss    {summary['val/loss']:.4f} (step {summary['val_step']}{start})   "
            f"val/ppl {summary['val/ppl']:.2f}"
        )
    if "train/loss" in m:
        average = summary.get("tokens_per_sec_run")
        speed = (
            f"{average:.0f} (run average; last window {m['train/tokens_per_sec']:.0f})"
            if average
            else f"{m['train/tokens_per_sec']:.0f}"
        )
        lines.append(f"  train/loss  {m['train/loss']:.4f}   tokens/s {speed}")
    if module.moe_layers and f"moe/layer{module.moe_layers[0]}/imbalance" in m:
        special = f"moe/layer{module.moe_layers[0]}/specialization" in m
        lines.append(
            "  layer  imbalance  min load  dropped  dead  starved  entropy/logE  experts/token"
            + ("  specialization" if special else "")
            + "  busiest expert"
        )
        for layer in module.moe_layers:
            p = f"moe/layer{layer}/"
            loads = [m[f"{p}expert{e}/load"] for e in range(module.model_cfg.experts_in(layer))]
            top = max(range(len(loads)), key=loads.__getitem__)
            lines.append(
                f"  {layer:>5}  {m[p + 'imbalance']:>9.2f}  {m[p + 'min_load']:>8.2f}  "
                f"{m[p + 'dropped_frac']:>7.1%}  {m[p + 'dead_experts']:>4.0f}  {m[p + 'starved_experts']:>7.0f}  "
                f"{m[p + 'entropy_norm']:>12.3f}  {m.get(p + 'experts_per_token', float('nan')):>13.2f}"
                + (f"  {m[p + 'specialization']:>14.3f}" if special else "")
                + f"  #{top} ({loads[top]:.1%})"
            )
    if "dashboard" in summary:
        lines.append(f"  dashboard   {summary['dashboard']}")
    lines.append(f"  checkpoint  {summary['checkpoint']}")
    lines.append(f"  metrics     {summary['metrics_csv']}")
    lines.append(f"  resume      moe-lab train ckpt_path={summary['checkpoint']}")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------------------
# The records


def run_summary(
    run: TrainConfig,
    trainer: L.Trainer,
    module: MoELanguageModel,
    routing: "RoutingMetrics",
    stop: GracefulStop,
    output_dir: Path,
    started: float,
) -> dict[str, Any]:
    """summary.json's content: final metrics, sizes, and where everything is."""
    return {
        "status": "finished" if stop.received is None else "interrupted",
        "step": trainer.global_step,
        "seconds": round(time.time() - started, 1),
        **module.last_val_metrics,
        "val_step": module.last_val_step,
        "initial_val_loss": module.first_val_loss,
        # Run-level figures only; per-layer and per-expert ones are in metrics.csv and routing.jsonl.
        **{k: v for k, v in module.last_train_metrics.items() if not k.startswith("moe/layer")},
        "tokens_per_sec_run": routing.run_tokens_per_sec,
        "params": module.model.num_params(),
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "frozen": [name for name, part in module.parts().items() if part["frozen"]],
        "lr_mult": {k: float(v) for k, v in run.optim.lr_mult.items()},
        "output_dir": str(output_dir),
        "checkpoint": str(output_dir / "checkpoints" / "last.ckpt"),
        "metrics_csv": str(output_dir / "metrics.csv"),
        "produced_by": module.provenance.get("produced_by"),
    }


def ended_early(
    error: BaseException,
    trainer: L.Trainer,
    module: MoELanguageModel,
    kept: Optional[Path],
    output_dir: Path,
    started: float,
) -> Exception:
    """A run that ended before its last step (divergence, a full disk, Ctrl-C twice): the loggers flushed, a
    summary.json that says so and names the last checkpoint written whole; returns what to raise (one line)."""
    endings: dict[type, tuple[str, str]] = {
        AbortRequested: ("aborted", "Ctrl-C twice: aborted without a checkpoint"),
        Diverged: ("diverged", str(error)),
    }
    status, line = endings.get(type(error), ("failed", f"disk full: {error}"))
    try:
        for logger in trainer.loggers:
            logger.finalize("failed")  # the rows logged so far reach metrics.csv
        if trainer.is_global_zero:
            save_summary(
                {
                    "status": status,
                    "step": trainer.global_step,
                    "error": line,
                    "seconds": round(time.time() - started, 1),
                    **module.last_val_metrics,
                    "checkpoint": str(kept) if kept is not None else None,
                    "metrics_csv": str(output_dir / "metrics.csv"),
                    "produced_by": module.provenance.get("produced_by"),
                },
                output_dir,
            )
        wrote = ""
    except OSError:  # a full disk may refuse the summary too
        wrote = " (summary.json could not be written either)"
    step = trainer.global_step
    if isinstance(error, AbortRequested):
        print(
            f"moe-lab: aborted at step {step} (Ctrl-C twice) without a checkpoint"
            + (f"; the last one written is {kept}" if kept is not None else "")
            + wrote,
            file=sys.stderr,
            flush=True,
        )
        return Interrupted(signal.SIGINT)
    if isinstance(error, Diverged):
        return Diverged(
            f"{error}; the last good checkpoint is {kept}{wrote}"
            if kept is not None
            else f"{error}; no checkpoint was written (none had finite weights yet){wrote}"
        )
    where = f"the last checkpoint written whole is {kept}" if kept is not None else "no checkpoint was written whole"
    resume = f". Free some space, then resume with ckpt_path={kept}" if kept is not None else ""
    filename, reason = getattr(error, "filename", None), getattr(error, "strerror", None)  # an OSError's
    return DiskFull(f"the disk is full ({filename or output_dir}: {reason}) at step {step}; {where}{wrote}{resume}")


def stopped_before_training(signum: int, output_dir: Path, loggers: Optional[list] = None) -> None:
    """Ctrl-C or SIGTERM before the first optimizer step: say so in one line, leave a summary, exit 128 + signum."""
    name = signal.Signals(signum).name
    for logger in loggers or []:
        logger.finalize("failed")
    if not launched_worker():
        save_summary(
            {
                "status": "interrupted",
                "step": 0,
                "checkpoint": None,
                "error": f"{name} before the first training step: nothing was trained",
            },
            output_dir,
        )
        print(
            f"moe-lab: {name} before the first training step: nothing was trained and no checkpoint was written; "
            f"run the same command again with a new hydra.run.dir",
            file=sys.stderr,
            flush=True,
        )
    raise Interrupted(signum)


def record_resume(ckpt_path: str, output_dir: Path) -> None:
    """resumed_from.json: the checkpoint, its step and the run that wrote it, so this run's dashboard can show the
    curves from step 0 (analysis/runs.py follows the chain)."""
    origin = checkpoint_origin(ckpt_path)
    write_atomically(
        output_dir / RESUMED_FROM,
        json.dumps(
            {
                "checkpoint": str(Path(ckpt_path).absolute()),
                "step": origin.step,
                "run_dir": str(origin.run_dir) if origin.run_dir is not None else None,
            },
            indent=2,
        )
        + "\n",
    )


def command_line_overrides() -> list[str]:
    """The overrides this run was started with (Hydra's task overrides), less those a resumed run does not inherit;
    [] when train() is called without Hydra's command line."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task if saved(str(o))]
