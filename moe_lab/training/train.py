"""`train(cfg)`: one training run from a composed config, as a plain function (the command line's Hydra app and the
tests both call it). It returns the run summary: final metrics and where everything is."""

from __future__ import annotations

import errno
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from moe_lab.analysis.pages import write_dashboard
from moe_lab.data.datamodule import LMDataModule
from moe_lab.errors import ConfigError, Diverged, UserError
from moe_lab.files import remove_stale_temp_files
from moe_lab.model.config import padded_vocab_size
from moe_lab.training.auto import auto_choices
from moe_lab.training.callbacks import AbortRequested, GracefulStop, StepProgressBar, StopRequested
from moe_lab.training.checkpoint import (
    AtomicCheckpointIO,
    checkpoint_origin,
    is_checkpoint,
    tokenizer_identity,
)
from moe_lab.training.fsdp import MoEFSDPStrategy
from moe_lab.training.loggers import build_loggers, finish_wandb
from moe_lab.training.metrics import RoutingMetrics
from moe_lab.training.module import MoELanguageModel
from moe_lab.training.report import (
    Interrupted,
    command_line_overrides,
    ended_early,
    print_header,
    print_summary,
    produced_by,
    record_resume,
    run_summary,
    save_summary,
    stopped_before_training,
)
from moe_lab.training.run_dir import (
    claim_run_dir,
    launched_worker,
    release_run_dir,
)
from moe_lab.training.runtime import cpu_threads, quiet_lightning, retain_freed_memory
from moe_lab.training.schemas import TrainConfig, validate
from moe_lab.training.start import StartingPoint, starting_point
from moe_lab.training.strategy import make_strategy, writes_sharded
from moe_lab.training.sweeps import continued_job


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as `cfg` says; returns the run summary (final metrics and where things are)."""
    run = validate(cfg)
    quiet_lightning()
    retain_freed_memory()  # CPU steps reuse freed memory instead of page-faulting it back (training/runtime.py)
    devices = run.trainer.get("devices")
    data_parallel = str(run.trainer.get("strategy", "")).startswith(("ddp", "fsdp")) and isinstance(devices, int)
    torch.set_num_threads(cpu_threads(run.threads, devices if data_parallel and isinstance(devices, int) else 1))
    output_dir = Path(run.paths.output_dir).expanduser().resolve()
    done_before = continued_job(run, output_dir)
    if done_before is not None:
        return done_before
    start = starting_point(run)
    if not launched_worker():  # data-parallel workers share the directory rank 0 claimed
        claim_run_dir(output_dir)
        if start.resume is not None:
            remove_stale_temp_files(Path(start.resume).parent)  # what a save killed mid-write left beside it
    # Ctrl-C and SIGTERM are moe-lab's from here on, whatever the run is doing when they come.
    stop = GracefulStop(str(output_dir / "checkpoints" / "last.ckpt"))
    stop.install()
    try:
        return _train(run, cfg, output_dir, start, stop)
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


def _train(
    run: TrainConfig,
    cfg: DictConfig,
    output_dir: Path,
    start: StartingPoint,
    stop: GracefulStop,
) -> dict[str, Any]:
    """build (data, model) -> trainer -> fit -> summary."""
    started = time.time()
    L.seed_everything(run.seed, workers=True, verbose=False)
    data = prepared_data(run, output_dir, stop)
    module = build_module(run, data, output_dir, start)
    callbacks = RunCallbacks.build(run, module, data, output_dir, stop)
    loggers = build_loggers(run, cfg, output_dir, module.provenance["produced_by"])
    try:
        trainer = build_trainer(run, callbacks, loggers, output_dir)
        print_header(run, module, data, output_dir, auto_choices(cfg.get("trainer"), cfg.get("compile"), run))
        fit(trainer, module, data, start.resume, stop, callbacks, output_dir, started)
        summary = run_summary(run, trainer, module, callbacks.routing, stop, output_dir, started)
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
    start: StartingPoint,
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
        # Under expert parallelism a rank builds only its own experts (the strategy materialises them) and takes only
        # their rows of the weights the run starts from.
        experts_on_meta=model_cfg.moe.expert_parallel > 1,
    )
    if start.source is not None:
        if model_cfg.moe.expert_parallel > 1:
            module.starting_weights = (start.read_weights, start.source)  # read by the strategy (keep_own_experts)
            hub = (
                run.upcycle.method is None and start.weights is not None and not is_checkpoint(str(run.model.init_from))
            )
            if hub and not launched_worker():
                print(
                    f"moe-lab: every rank reads the whole of {run.model.init_from} (transformers loads it whole) "
                    f"before keeping its experts; to read only each rank's part, import it once (moe-lab import "
                    f"{run.model.init_from} DIR) and start from ckpt_path=DIR/model.ckpt",
                    flush=True,
                )
        else:
            module.load_weights(start.read_weights(), start.source)
        if not launched_worker() and run.upcycle.method is not None:
            print(
                f"moe-lab: upcycled {run.model.init_from} ({run.upcycle.method}): experts of "
                f"{run.model.moe.expert_hidden} hidden units from its FFNs of {run.model.ffn_hidden}",
                flush=True,
            )
        elif not launched_worker() and start.weights is not None:
            print(
                f"moe-lab: starting from the weights of {run.model.init_from} (a new run: step 0, fresh optimizer)",
                flush=True,
            )
    if run.routing.replay is not None:
        from moe_lab.analysis.trace import RoutingTrace
        from moe_lab.training.routing_replay import check_trace_fits

        module.routing_trace = RoutingTrace(Path(run.routing.replay).expanduser())
        check_trace_fits(module.routing_trace, module.model, "routing.replay")
    if run.compile:
        module.compile_training_forward()
    module.provenance = {
        "overrides": command_line_overrides(),
        "run_dir": str(output_dir),
        "data": data.cache_key(),
        "tokenizer": tokenizer_identity(data.tokenizer),
        "produced_by": produced_by(run),
    }
    if start.resume is not None and not launched_worker():
        record_resume(start.resume, output_dir)
        trained_on = checkpoint_origin(start.resume).data
        if trained_on is not None and trained_on != data.cache_key():
            print(
                f"moe-lab: note: {start.resume} was trained on other data than {data.describe()} gives now (its "
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
            routed_expert_flops=module.model.routed_expert_flops(),
        )
        stop.before_save = routing.flush
        # RoutingMetrics before GracefulStop (a stop logs the steps since the last log step first) and before the
        # progress bar (which shows the metrics of the step just logged).
        callbacks = [periodic, routing, stop, StepProgressBar()]
        if run.metrics.analysis_every_n_steps:
            from moe_lab.training.routing_analysis import RoutingAnalysis, check_analysable

            check_analysable(module.model)
            callbacks.insert(2, RoutingAnalysis(run.metrics.analysis_every_n_steps, run.trainer.get("max_steps", -1)))
        if run.routing.record is not None:
            from moe_lab.training.routing_replay import RoutingRecorder

            callbacks.append(RoutingRecorder(run.routing.record, data.domain_names))
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
        signum = stop.agreed(trainer) if ckpt_path is None else None  # a signal after the validation, on any rank
        if signum is not None:
            stopped_before_training(signum, output_dir, trainer.loggers)
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        except StopRequested:
            pass  # Ctrl-C or SIGTERM: GracefulStop saved last.ckpt at the step boundary
        if stop.received is None:
            if module.last_val_step != trainer.global_step:
                trainer.validate(module, datamodule=data, verbose=False)  # every run ends with a val/loss
            last = output_dir / "checkpoints" / "last.ckpt"
            # Rank 0 links last.ckpt; deciding from the file on every rank raced that link (one rank saved, in a
            # collective the others never joined: a hang). Rank 0 decides, every rank follows.
            already = trainer.strategy.broadcast(saved_at(callbacks.periodic, last, trainer.global_step), src=0)
            if not already:
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


def saved_at(periodic: ModelCheckpoint, last: Path, step: int) -> bool:
    """Whether last.ckpt is already a link to the periodic checkpoint of `step` (save_last="link"): then it is the
    final checkpoint, and saving it again would write a second copy of the same weights."""
    score = periodic.best_model_score
    return last.is_symlink() and last.exists() and score is not None and int(score) == step


def trainer_arguments(run: TrainConfig) -> dict:
    """The trainer config, with `strategy: ddp` made moe-lab's DDP (which owns expert parallelism), and `strategy:
    fsdp` its FSDP2 beside it."""
    args = dict(run.trainer)
    strategy = args.get("strategy")
    if isinstance(strategy, str) and strategy in ("ddp", "ddp_find_unused_parameters_true", "fsdp"):
        expert_parallel = run.model.moe.expert_parallel if run.model.moe.enabled else 1
        args["strategy"] = make_strategy(
            strategy,
            expert_parallel,
            run.checkpoint.format,
            run.checkpoint.async_save,
            run.rendezvous_timeout_s,
            Path(run.paths.output_dir).expanduser().resolve(),
            kind=MoEFSDPStrategy if strategy == "fsdp" else None,
        )
    return args
