"""Lightning callbacks of the training run."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar


class StopRequested(Exception):
    """Raised at an optimizer-step boundary after Ctrl-C or SIGTERM, once the checkpoint is written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class AbortRequested(Exception):
    """A second Ctrl-C: stop now, without a checkpoint. An Exception, not KeyboardInterrupt, so that Lightning tears
    the run down and hands it back (on KeyboardInterrupt it exits the process with code 1 itself)."""


def preemption_signals() -> tuple[signal.Signals, ...]:
    """Inside a submitit job (SLURM, or submitit's local executor): the signal submitit pre-empts and times out with
    (USR2, or what SUBMITIT_PREEMPT_SIGNAL names). Elsewhere none."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return ()
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    found = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    return (found,) if isinstance(found, signal.Signals) else ()


class GracefulStop(L.Callback):
    """Ctrl-C or SIGTERM: finish the optimizer step in flight, save `last.ckpt`, then stop (no more validation).
    Inside a submitit job, its pre-emption signal too (submitit's checkpointing protocol): moe-lab saves at the step
    boundary as for SIGTERM, and when the run has ended, hands the signal on to submitit's own handler
    (`pass_on_preemption`), which requeues the job; the requeued job resumes from that checkpoint (a continued
    sweep job, `train.continued_job`).

    The handler is installed before any work (`install()`, at the top of `train()`), and again whenever Lightning has
    put its own in place (at the start of fit, validation and training), so a pre-emption is moe-lab's to handle at
    any moment: while the data is prepared or the untrained model is validated, the run stops before its first step
    (nothing trained, nothing saved, said in one line); later, at the next optimizer-step boundary with a checkpoint.
    A second Ctrl-C aborts at once (AbortRequested), without a checkpoint: the run exits 130 with a summary.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(
        self, last_checkpoint: str, before_save: Optional[Callable[[L.Trainer, L.LightningModule], None]] = None
    ) -> None:
        self.last_checkpoint = last_checkpoint
        self.before_save = before_save  # e.g. log the steps since the last log step
        self.signals = (*self.SIGNALS, *preemption_signals())
        self.received: Optional[int] = None
        self._handed_over: dict[int, Any] = {}  # the handlers restore() put back
        self._previous: dict[int, Any] = {}
        self._last_step: Optional[int] = None

    def install(self) -> None:
        """Make this callback's handler the one for its signals (remembering the first one it replaced)."""
        for sig in self.signals:
            try:
                previous = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some launchers): leave the signal alone
                continue
            if previous != self._handle:
                self._previous.setdefault(sig, previous)

    # Lightning registers its own SIGTERM handler (which ends validation with exit code 0) when fit or validate
    # starts: put ours back, alone.
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self.install()

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        """The validation of the untrained model (trainer.validate, before fit) stops at once: nothing to save."""
        if trainer.training or trainer.state.fn != "validate":
            return
        signum = self.agreed(trainer)
        if signum is not None:
            raise StopRequested(signum)

    def agreed(self, trainer: L.Trainer) -> Optional[int]:
        """The signal any rank received (every rank learns of it), or None: a stop signal may reach some ranks only
        (SLURM pre-empting one node), and every rank must stop at the same point, or the ones still running would
        wait forever in a collective."""
        if trainer.world_size > 1:
            flag = torch.tensor([0 if self.received is None else self.received], device=trainer.strategy.root_device)
            self.received = int(trainer.strategy.reduce(flag, reduce_op="max").item()) or None
        return self.received

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise AbortRequested("Ctrl-C twice")
        self.received = signum
        then = (
            "; submitit then requeues the job, which resumes from it"
            if signum in preemption_signals()
            else " (Ctrl-C again to abort without one)"
        )
        name = signal.Signals(signum).name
        print(
            f"\nmoe-lab: {name} received: stopping after this step and saving a checkpoint{then}",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        stepped = trainer.global_step != self._last_step  # an optimizer step just finished (not mid-accumulation)
        self._last_step = trainer.global_step
        signum = self.agreed(trainer) if stepped else None
        if signum is not None:
            if self.before_save is not None:
                self.before_save(trainer, trainer.lightning_module)
            trainer.save_checkpoint(self.last_checkpoint, weights_only=False)
            raise StopRequested(signum)

    def restore(self) -> None:
        """Put back the handlers `install()` replaced (train() calls it when the run ends, however it ends)."""
        self._handed_over = dict(self._previous)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def pass_on_preemption(self) -> None:
        """After a stop by submitit's pre-emption signal (checkpoint saved, summary written, handlers restored): raise
        it again for submitit's handler, which requeues the job and exits (on rank 0; other ranks return here)."""
        signum = self.received
        if signum in preemption_signals() and callable(self._handed_over.get(signum)):
            signal.raise_signal(signum)


class StepProgressBar(ProgressBar):
    """One bar over optimizer steps with the last logged loss, validation loss, tokens/s and the worst layer's
    imbalance. It reads the metrics the module already computed at its last log step: no extra device sync. When the
    standard output is not a terminal (nohup, SLURM, a pipe), a plain line every `PLAIN_EVERY_S` seconds and at the
    end instead: a log file gets no carriage returns."""

    PLAIN_EVERY_S = 30.0

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.bar: Any = None  # tqdm's bar, on a terminal
        self.plain: Optional[dict] = None  # {"started", "last", "first_step"} of the line mode

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        if not sys.stdout.isatty():
            now = time.monotonic()
            self.plain = {"started": now, "last": now, "first_step": trainer.global_step}
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=trainer.max_steps,
            initial=trainer.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
            mininterval=0.5,
            smoothing=0.1,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.bar is not None and trainer.global_step != self.bar.n:
            self._refresh(trainer, pl_module)
        elif self.plain is not None and time.monotonic() - self.plain["last"] >= self.PLAIN_EVERY_S:
            self._line(trainer, pl_module)

    # The module logs after the callbacks' on_train_batch_end; show its metrics at the next batch and the end.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.bar is not None:
            self._refresh(trainer, pl_module)

    @staticmethod
    def _postfix(pl_module: L.LightningModule) -> dict[str, str]:
        train, val = getattr(pl_module, "last_train_metrics", {}), getattr(pl_module, "last_val_metrics", {})
        postfix = {}
        if "train/loss" in train:
            postfix["loss"] = f"{train['train/loss']:.3f}"
        if "val/loss" in val:
            postfix["val"] = f"{val['val/loss']:.3f}"
        if "train/tokens_per_sec" in train:
            postfix["tok/s"] = f"{train['train/tokens_per_sec'] / 1e3:.1f}k"
        imbalance = [v for k, v in train.items() if k.endswith("/imbalance")]
        if imbalance:
            postfix["max_imb"] = f"{max(imbalance):.2f}"
        return postfix

    def _refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(self._postfix(pl_module), refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`train: step 120/500, 62 s, about 3 min left; loss=2.345, val=2.401, tok/s=11.8k, max_imb=2.10`."""
        plain = self.plain
        if plain is None:
            return
        now = time.monotonic()
        step, done = trainer.global_step, trainer.global_step - plain["first_step"]
        elapsed = now - plain["started"]
        left = elapsed / done * (trainer.max_steps - step) if done > 0 else None
        when = f"{elapsed:.0f} s" + (f", about {left / 60:.1f} min left" if left and step < trainer.max_steps else "")
        metrics = ", ".join(f"{k}={v}" for k, v in self._postfix(pl_module).items())
        print(f"train: step {step}/{trainer.max_steps}, {when}" + (f"; {metrics}" if metrics else ""), flush=True)
        plain["last"] = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self._refresh(trainer, pl_module)
            self.bar.close()
            self.bar = None
        if self.plain is not None:
            self._line(trainer, pl_module)
            self.plain = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
