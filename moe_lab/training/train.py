"""`train(cfg)`: one training run from a composed config, as a plain function (the command line's Hydra app and the
tests both call it). It returns the run summary: final metrics and where everything is."""

from __future__ import annotations

import errno
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from moe_lab.analysis.dashboard import write_dashboard
from moe_lab.analysis.runs import RESUMED_FROM
from moe_lab.data.datamodule import LMDataModule
from moe_lab.errors import ConfigError, DiskFull, Diverged, UserError
from moe_lab.files import remove_stale_temp_files, write_atomically
from moe_lab.model.config import padded_vocab_size
from moe_lab.training.callbacks import AbortRequested, GracefulStop, StepProgressBar, StopRequested
from moe_lab.training.checkpoint import (
    AtomicCheckpointIO,
    check_resume,
    checkpoint_origin,
    holds_training_state,
    load_weights,
    saved,
    tokenizer_identity,
)
from moe_lab.training.loggers import build_loggers, finish_wandb
from moe_lab.training.metrics import RoutingMetrics
from moe_lab.training.module import MoELanguageModel
from moe_lab.training.provenance import describe_code, run_provenance
from moe_lab.training.run_dir import (
    attempt_checkpoint,
    claim_run_dir,
    claimed_by_this_sweep,
    job_state,
    launched_worker,
    previous_attempt,
    release_run_dir,
)
from moe_lab.training.runtime import cpu_threads, oversubscription, quiet_lightning, retain_freed_memory
from moe_lab.training.schemas import TrainConfig, auto_choices, validate
from moe_lab.training.strategy import make_strategy, writes_sharded
from moe_lab.training.sweeps import set_aside_requeued
from moe_lab.training.upcycle import apply_upcycling


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint; the process exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as `cfg` says; returns the run summary (final metrics and where things are)."""
    run = validate(cfg)
    quiet_lightning()
    retain_freed_memory()  # CPU steps reuse freed memory instead of page-faulting it back (training/runtime.py)
    devices = run.trainer.get("devices")
    data_parallel = str(run.trainer.get("strategy", "")).startswith("ddp") and isinstance(devices, int)
    torch.set_num_threads(cpu_threads(run.threads, devices if data_parallel else 1))
    output_dir = Path(run.paths.output_dir).expanduser().resolve()
    done_before = continued_job(run, output_dir)
    if done_before is not None:
        return done_before
    resuming = run.ckpt_path is not None and holds_training_state(run.ckpt_path)
    upcycled_weights = apply_upcycling(run, run.ckpt_path if resuming else None)  # model.init_from: settings
    ckpt_path = check_resume(run.ckpt_path, run.model, run.trainer.get("max_steps"), run.tokenizer)
    init_from = None
    if ckpt_path is not None and not holds_training_state(ckpt_path):
        init_from, ckpt_path = ckpt_path, None  # an imported model: a new run from its weights (fine-tuning)
    if not launched_worker():  # data-parallel workers share the directory rank 0 claimed
        claim_run_dir(output_dir)
        if ckpt_path is not None:
            remove_stale_temp_files(Path(ckpt_path).parent)  # what a save killed mid-write left beside it
    # Ctrl-C and SIGTERM are moe-lab's from here on, whatever the run is doing when they come.
    stop = GracefulStop(str(output_dir / "checkpoints" / "last.ckpt"))
    stop.install()
    try:
        return _train(run, cfg, output_dir, ckpt_path, stop, init_from, upcycled_weights)
    except AbortRequested:  # Ctrl-C twice outside the training loop (data preparation, the final writes)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the few lines below are not cut short by a third
        last = output_dir / "checkpoints" / "last.ckpt"
        if not launched_worker() and not (output_dir / "summary.json").exists():
            save_summary(
                {"status": "aborted", "error": "Ctrl-C twice", "checkpoint": str(last) if last.exists() else None},
                output_dir,
            )
        print(
            "moe-lab: aborted (Ctrl-C twice)" + (f"; the last checkpoint is {last}" if last.exists() else ""),
            file=sys.stderr,
            flush=True,
        )
        raise Interrupted(signal.SIGINT) from None
    finally:
        stop.restore()
        stop.pass_on_preemption()  # inside a submitit job: submitit requeues it (it resumes from last.ckpt)


def continued_job(run: TrainConfig, output_dir: Path) -> Optional[dict[str, Any]]:
    """A job of a sweep that is being continued (the same command again, training/sweeps.py): the summary of a job that
    finished before, to skip it (a diverged one fails again at once, with its reason); for a job whose earlier run
    stopped, `run.ckpt_path` becomes that run's last checkpoint, so the job resumes from it. None otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    if not launched_worker():  # data-parallel workers only follow rank 0 (which they would not run without)
        if not claimed_by_this_sweep(Path(HydraConfig.get().sweep.dir)):
            return None
        state, summary = job_state(output_dir)
        if state == "diverged":
            raise Diverged(f"{summary.get('error', 'training diverged')} (an earlier run of this job; kept as it was)")
        if state == "finished":
            print(
                f"moe-lab: job {output_dir.name} finished before (val/loss {summary.get('val/loss')}): kept, not "
                "run again",
                flush=True,
            )
            return summary
        if state == "stopped" and set_aside_requeued(output_dir) is not None:
            print(f"moe-lab: job {output_dir.name} ran before in this sweep and stopped (a requeued job)", flush=True)
    else:
        wait_for_rank_zero_to_set_aside(output_dir)
    attempt = previous_attempt(output_dir)
    ckpt = attempt_checkpoint(attempt) if attempt is not None and run.ckpt_path is None else None
    if ckpt is not None:
        run.ckpt_path = str(ckpt)
        print(f"moe-lab: job {output_dir.name} resumes from {ckpt}", flush=True)
    return None


def wait_for_rank_zero_to_set_aside(output_dir: Path, timeout_s: float = 300.0) -> None:
    """In a rank > 0 of a requeued job (several tasks per job), the stopped run's summary is still in the job folder
    until rank 0 has set it aside: wait for that, so that every rank resumes from the same attempt."""
    import time

    deadline = time.monotonic() + timeout_s
    while (output_dir / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _train(
    run: TrainConfig,
    cfg: DictConfig,
    output_dir: Path,
    ckpt_path: Optional[str],
    stop: GracefulStop,
    init_from: Optional[str] = None,
    upcycled_weights: Optional[Callable[[], dict]] = None,
) -> dict[str, Any]:
    """build (data, model) -> trainer -> fit -> summary."""
    started = time.time()
    L.seed_everything(run.seed, workers=True, verbose=False)
    data = prepared_data(run, output_dir, stop)
    module = build_module(run, data, output_dir, ckpt_path, init_from, upcycled_weights)
    callbacks = RunCallbacks.build(run, module, data, output_dir, stop)
    loggers = build_loggers(run, cfg, output_dir, module.provenance["produced_by"])
    try:
        trainer = build_trainer(run, callbacks, loggers, output_dir)
        print_header(run, module, data, output_dir, auto_choices(cfg.get("trainer"), cfg.get("compile"), run))
        fit(trainer, module, data, ckpt_path, stop, callbacks, output_dir, started)
        summary = run_summary(run, trainer, module, callbacks, stop, output_dir, started)
        for logger in trainer.loggers:
            logger.finalize("success" if stop.received is None else "failed")
        if trainer.is_global_zero:
            save_summary(summary, output_dir)
            if run.metrics.dashboard:  # after summary.json and the flushed metrics.csv, which it reads
                summary["dashboard"] = str(write_dashboard(output_dir, output_dir / "dashboard.html"))
                save_summary(summary, output_dir)
        print_summary(summary, module)
    finally:
        finish_wandb(loggers)
    if stop.received is not None:
        raise Interrupted(stop.received)
    return summary


def prepared_data(run: TrainConfig, output_dir: Path, stop: GracefulStop) -> LMDataModule:
    """The data read, tokenised and split; a data error releases the run directory (nothing was written)."""
    data = LMDataModule(run.data, run.tokenizer, run.paths.cache_dir, run.seed)
    try:
        data.prepare_data()
        data.setup("fit")  # data errors surface here, before a model or trainer exists
    except UserError:
        release_run_dir(output_dir)  # nothing was written: the corrected command may use the directory
        raise
    if stop.received is not None:
        stopped_before_training(stop.received, output_dir)
    return data


def build_module(
    run: TrainConfig,
    data: LMDataModule,
    output_dir: Path,
    ckpt_path: Optional[str],
    init_from: Optional[str],
    upcycled_weights: Optional[Callable[[], dict]],
) -> MoELanguageModel:
    """The LightningModule: the model sized to the tokenizer, its starting weights, and what produced the run."""
    model_cfg = run.model
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = padded_vocab_size(data.vocab_size)
    elif model_cfg.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{data.vocab_size}; set it to null to follow the tokenizer"
        )
    module = MoELanguageModel(
        model=model_cfg,
        optim=run.optim,
        domain_names=data.domain_names,
        tokenizer={"name": run.tokenizer.name, "eos_token": run.tokenizer.eos_token},
        seed=run.seed,
    )
    if init_from is not None:
        load_weights(module, init_from)
    if upcycled_weights is not None:
        module.model.load_state_dict(upcycled_weights())
        if not launched_worker() and run.upcycle.method is not None:
            print(
                f"moe-lab: upcycled {run.model.init_from} ({run.upcycle.method}): experts of "
                f"{run.model.moe.expert_hidden} hidden units from its FFNs of {run.model.ffn_hidden}",
                flush=True,
            )
        elif not launched_worker():
            print(
                f"moe-lab: starting from the weights of {run.model.init_from} (a new run: step 0, fresh optimizer)",
                flush=True,
            )
    if run.compile:
        module.compile_training_forward()
    module.provenance = {
        "overrides": command_line_overrides(),
        "run_dir": str(output_dir),
        "data": data.cache_key(),
        "tokenizer": tokenizer_identity(data.tokenizer),
        "produced_by": produced_by(run),
    }
    if ckpt_path is not None and not launched_worker():
        record_resume(ckpt_path, output_dir)
        trained_on = checkpoint_origin(ckpt_path).data
        if trained_on is not None and trained_on != data.cache_key():
            print(
                f"moe-lab: note: {ckpt_path} was trained on other data than {data.describe()} gives now (its "
                "content or its settings differ): the resumed run continues on the data as it is now",
                file=sys.stderr,
                flush=True,
            )
    return module


@dataclass
class RunCallbacks:
    """The run's Lightning callbacks, and the ones the run reads back: periodic checkpoints, routing metrics and
    the atomic checkpoint writer (a plugin)."""

    periodic: ModelCheckpoint
    routing: RoutingMetrics
    checkpoint_io: AtomicCheckpointIO
    all: list

    @classmethod
    def build(
        cls, run: TrainConfig, module: MoELanguageModel, data: LMDataModule, output_dir: Path, stop: GracefulStop
    ) -> "RunCallbacks":
        periodic = ModelCheckpoint(
            dirpath=output_dir / "checkpoints",
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=run.checkpoint.every_n_steps,
            save_top_k=run.checkpoint.keep,
            monitor="step",
            mode="max",
            save_last="link",
        )
        routing = RoutingMetrics(
            data.domain_names,
            module.model.flops_per_token(run.data.seq_len),
            output_dir,
            image_every_n_steps=run.metrics.image_every_n_steps,
        )
        stop.before_save = routing.flush
        # RoutingMetrics before GracefulStop (a stop logs the steps since the last log step first) and before the
        # progress bar (which shows the metrics of the step just logged).
        callbacks = [periodic, routing, stop, StepProgressBar()]
        if run.metrics.analysis_every_n_steps:
            from moe_lab.training.routing_analysis import RoutingAnalysis, check_analysable

            check_analysable(module.model)
            callbacks.insert(2, RoutingAnalysis(run.metrics.analysis_every_n_steps, run.trainer.get("max_steps", -1)))
        sharded = writes_sharded(run.checkpoint.format, 1, run.checkpoint.async_save)  # one process: no experts split
        io = AtomicCheckpointIO(sharded=sharded, async_save=run.checkpoint.async_save)
        return cls(periodic, routing, io, callbacks)


def build_trainer(run: TrainConfig, callbacks: RunCallbacks, loggers: list, output_dir: Path) -> L.Trainer:
    trainer = L.Trainer(
        **trainer_arguments(run),
        logger=loggers,
        plugins=[callbacks.checkpoint_io],
        callbacks=callbacks.all,
        default_root_dir=str(output_dir),
        max_epochs=-1,
        check_val_every_n_epoch=None,
        use_distributed_sampler=False,
    )
    ep = run.model.moe.expert_parallel
    if trainer.world_size % ep:
        raise ConfigError(
            f"model.moe.expert_parallel={ep} must divide the world size {trainer.world_size} "
            "(trainer.devices x trainer.num_nodes)"
        )
    return trainer


def fit(
    trainer: L.Trainer,
    module: MoELanguageModel,
    data: LMDataModule,
    ckpt_path: Optional[str],
    stop: GracefulStop,
    callbacks: RunCallbacks,
    output_dir: Path,
    started: float,
) -> None:
    """The untrained model's val/loss (a new run), training to max_steps or a stop, a final val/loss and last.ckpt;
    divergence, a full disk and Ctrl-C twice end it early (`ended_early`)."""
    try:
        if ckpt_path is None:
            try:  # the untrained model's val/loss, at step 0
                trainer.validate(module, datamodule=data, verbose=False)
            except StopRequested as e:
                stopped_before_training(e.signum, output_dir, trainer.loggers)
        if stop.received is not None and ckpt_path is None:
            stopped_before_training(stop.received, output_dir, trainer.loggers)
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        except StopRequested:
            pass  # Ctrl-C or SIGTERM: GracefulStop saved last.ckpt at the step boundary
        if stop.received is None:
            if module.last_val_step != trainer.global_step:
                trainer.validate(module, datamodule=data, verbose=False)  # every run ends with a val/loss
            last = output_dir / "checkpoints" / "last.ckpt"
            if not saved_at(callbacks.periodic, last, trainer.global_step):
                trainer.save_checkpoint(last, weights_only=False)
        finish_saves(trainer)
    except (AbortRequested, OSError, Diverged) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        finish_saves(trainer, raise_error=False)
        raise ended_early(e, trainer, module, callbacks.checkpoint_io.last_saved, output_dir, started) from None


def finish_saves(trainer: L.Trainer, raise_error: bool = True) -> None:
    """Wait for a checkpoint being written in the background (checkpoint.async_save), so that it is in place before the
    run reports it; its error (a full disk) is raised here, or only waited out."""
    for holder in (trainer.strategy, trainer.strategy.checkpoint_io):
        writer = getattr(holder, "sharded_writer", None)
        if writer is not None:
            try:
                writer.wait()
            except Exception:
                if raise_error:
                    raise


def run_summary(
    run: TrainConfig,
    trainer: L.Trainer,
    module: MoELanguageModel,
    callbacks: RunCallbacks,
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
        "tokens_per_sec_run": callbacks.routing.run_tokens_per_sec,
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
    status, line = {
        AbortRequested: ("aborted", "Ctrl-C twice: aborted without a checkpoint"),
        Diverged: ("diverged", str(error)),
    }.get(type(error), ("failed", f"disk full: {error}"))
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
    return DiskFull(
        f"the disk is full ({error.filename or output_dir}: {error.strerror}) at step {step}; {where}{wrote}{resume}"
    )


def stopped_before_training(signum: int, output_dir: Path, loggers: Optional[list] = None) -> None:
    """Ctrl-C or SIGTERM before the first optimizer step: say so in one line, leave a summary, exit 128 + signum."""
    import signal

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


def saved_at(periodic: ModelCheckpoint, last: Path, step: int) -> bool:
    """Whether last.ckpt is already a link to the periodic checkpoint of `step` (save_last="link"): then it is the
    final checkpoint, and saving it again would write a second copy of the same weights."""
    score = periodic.best_model_score
    return last.is_symlink() and last.exists() and score is not None and int(score) == step


def command_line_overrides() -> list[str]:
    """The overrides this run was started with (Hydra's task overrides), less those a resumed run does not inherit;
    [] when train() is called without Hydra's command line."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task if saved(str(o))]


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


def trainer_arguments(run: TrainConfig) -> dict:
    """The trainer config, with `strategy: ddp` made moe-lab's DDP (which owns expert parallelism)."""
    args = dict(run.trainer)
    strategy = args.get("strategy")
    if isinstance(strategy, str) and strategy in ("ddp", "ddp_find_unused_parameters_true"):
        expert_parallel = run.model.moe.expert_parallel if run.model.moe.enabled else 1
        args["strategy"] = make_strategy(
            strategy,
            expert_parallel,
            run.checkpoint.format,
            run.checkpoint.async_save,
            run.rendezvous_timeout_s,
            Path(run.paths.output_dir).expanduser().resolve(),
        )
    return args


# ----------------------------------------------------------------------------------------------------------
# Printing


def produced_by(run: TrainConfig) -> dict[str, Any]:
    """The code version, packages, machine and precision of this run (training/provenance.py)."""
    trainer = run.trainer
    accelerator, precision = str(trainer.get("accelerator")), str(trainer.get("precision"))
    record = run_provenance(accelerator, trainer.get("devices", 1), precision, torch.get_num_threads())
    record["compile"] = bool(run.compile)
    return record


@rank_zero_only
def print_header(
    run: TrainConfig, module: MoELanguageModel, data: LMDataModule, output_dir: Path, chosen: list[str]
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
    print(
        f"moe-lab: data {run.data.source}: {train} train / {len(data.val_blocks)} val blocks of {run.data.seq_len} "
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
            "  layer  imbalance  min load  dropped  dead  starved  entropy/logE"
            + ("  specialization" if special else "")
            + "  busiest expert"
        )
        for layer in module.moe_layers:
            p = f"moe/layer{layer}/"
            loads = [m[f"{p}expert{e}/load"] for e in range(module.num_experts)]
            top = max(range(len(loads)), key=loads.__getitem__)
            lines.append(
                f"  {layer:>5}  {m[p + 'imbalance']:>9.2f}  {m[p + 'min_load']:>8.2f}  "
                f"{m[p + 'dropped_frac']:>7.1%}  {m[p + 'dead_experts']:>4.0f}  {m[p + 'starved_experts']:>7.0f}  "
                f"{m[p + 'entropy_norm']:>12.3f}"
                + (f"  {m[p + 'specialization']:>14.3f}" if special else "")
                + f"  #{top} ({loads[top]:.1%})"
            )
    if "dashboard" in summary:
        lines.append(f"  dashboard   {summary['dashboard']}")
    lines.append(f"  checkpoint  {summary['checkpoint']}")
    lines.append(f"  metrics     {summary['metrics_csv']}")
    lines.append(f"  resume      moe-lab train ckpt_path={summary['checkpoint']}")
    print("\n".join(lines), flush=True)
