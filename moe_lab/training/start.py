"""Where a run starts from, decided once: a training checkpoint to resume (`ckpt_path` of a moe-lab run), the weights
of an imported model to fine-tune from (`ckpt_path` of `moe-lab import`'s checkpoint: step 0, a fresh optimizer), the
weights of another model (`model.init_from`, as it is or upcycled), or a random initialisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from moe_lab.training.checkpoint import check_resume, read_checkpoint
from moe_lab.training.init_from import apply_upcycling
from moe_lab.training.sharded_checkpoint import ShardLayout


@dataclass(frozen=True)
class StartingPoint:
    resume: Optional[str] = None  # a checkpoint with training state: the run continues it (its step, its optimizer)
    init_from: Optional[str] = None  # a checkpoint of weights only (an imported model): a new run from them
    # model.init_from's weights, made when the model is built (given the rank's ShardLayout, or None)
    weights: Optional[Callable[[Optional[ShardLayout]], dict]] = None

    @property
    def source(self) -> Optional[str]:
        """What the run's weights come from, when not from a random initialisation or a resumed run."""
        return self.init_from if self.init_from is not None else ("model.init_from" if self.weights else None)

    def read_weights(self, layout: Optional[ShardLayout] = None) -> dict[str, Any]:
        """The weights the run starts from, named as the LightningModule's state dict: `init_from`'s (with `layout`,
        a sharded checkpoint is read as this rank's part; a checkpoint file is mapped, its pages read when copied),
        then model.init_from's over them."""
        state: dict[str, Any] = {}
        if self.init_from is not None:
            state.update(read_checkpoint(self.init_from, setting="ckpt_path", layout=layout)["state_dict"])
        if self.weights is not None:
            state.update({f"model.{name}": tensor for name, tensor in self.weights(layout).items()})
        return state


def starting_point(run: Any) -> StartingPoint:
    """Decide where `run` starts, and make `run.model` and `run.tokenizer` those of what it starts from (in place:
    model.init_from brings its backbone and tokenizer). Every refusal (a checkpoint of another model, tokenizer or a
    finished run; a model.init_from that does not fit) comes from here, before anything is written."""
    ckpt = read_checkpoint(run.ckpt_path, setting="ckpt_path", weights=False) if run.ckpt_path is not None else None
    trains_on = ckpt is not None and "optimizer_states" in ckpt
    weights = apply_upcycling(run, ckpt if trains_on else None)
    ckpt_path = check_resume(run.ckpt_path, run.model, run.trainer.get("max_steps"), run.tokenizer, ckpt=ckpt)
    if ckpt_path is not None and not trains_on:
        return StartingPoint(init_from=ckpt_path, weights=weights)
    return StartingPoint(resume=ckpt_path, weights=weights)
