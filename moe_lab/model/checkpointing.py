"""Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): a checkpointed part
keeps only its inputs for backward and runs its forward again there, through `torch.utils.checkpoint` (non-reentrant).

`model.activation_checkpointing`:

    none    keep every activation (the default)
    moe     recompute each MoE layer (router, dispatch, experts, combine): what an MoE model adds to a dense one's
            activations, k rows per token
    block   recompute each whole transformer block (attention and FFN): the least memory, one more forward

What a recompute must not change, and how:

    - the routing: the forward takes each MoE layer's live selection (outside the gradient), records it on a
      routing tape and routes as its replay (replay.py); the recompute replays it, so a router whose scores move in
      the last bits (bfloat16, another kernel) cannot take other experts the second time, and forward and recompute
      run the same operations (which non-reentrant checkpointing needs: it matches the tensors saved by order).
      Noise (noisy top-k, Switch jitter) is drawn from the RNG state the forward had (`preserve_rng_state`, and the
      live selection leaves the stream where it was), so the replayed experts get the weights they had;
    - what the forward counted: routers that count load for a step outside the gradient (aux-loss-free bias, the
      identity experts' and ReLU routing's controllers) count in the forward's replay only (`counts_load`); the aux
      losses and routing statistics are the forward's outputs, which the recompute does not return.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Hashable, Iterator, Optional, Protocol, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from moe_lab.model.config import ACTIVATION_CHECKPOINTING
from moe_lab.model.replay import RoutingTape


class TapedLayer(Protocol):
    """What pinning needs of an MoE layer (moe.py's MoELayer, which imports this module): its routing tape."""

    tape: Optional[RoutingTape]
    tape_mode: Optional[str]


__all__ = ["ACTIVATION_CHECKPOINTING", "checkpointed", "counts_load", "recomputes", "uncounted"]

_uncounted: contextvars.ContextVar[bool] = contextvars.ContextVar("moe_lab_uncounted", default=False)


def counts_load() -> bool:
    """Whether routers count the load they route now (for their steps outside the gradient): not in a checkpoint's
    recompute, nor in the live selection a checkpointed forward takes before routing as its replay."""
    return not _uncounted.get()


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    token = _uncounted.set(True)
    try:
        yield
    finally:
        _uncounted.reset(token)


class _PinRouting:
    """The forward's context: each MoE layer takes its live selection and routes as its replay ("pin"), recording it
    on a tape: its own if routing replay or recording gave it one (a replayed layer keeps replaying), else a new
    one. The recompute replays the same entry."""

    def __init__(self, layers: Sequence[TapedLayer], taken: dict[int, tuple[RoutingTape, Hashable]]):
        self.layers, self.taken = layers, taken
        self.saved: list[tuple[TapedLayer, Optional[RoutingTape], Optional[str]]] = []

    def __enter__(self) -> None:
        for layer in self.layers:
            self.saved.append((layer, layer.tape, layer.tape_mode))
            if layer.tape is None:
                layer.tape = RoutingTape()
            if layer.tape_mode != "replay":
                layer.tape_mode = "pin"
            self.taken[id(layer)] = (layer.tape, layer.tape.micro_batch)

    def __exit__(self, *exc: Any) -> None:
        for layer, tape, mode in reversed(self.saved):
            layer.tape, layer.tape_mode = tape, mode
        self.saved.clear()


class _ReplayPinned:
    """The recompute's context: every MoE layer replays what the forward took ("pinned"), and routers count
    nothing."""

    def __init__(self, layers: Sequence[TapedLayer], taken: dict[int, tuple[RoutingTape, Hashable]]):
        self.layers, self.taken = layers, taken
        # (layer, its tape and mode before, the replayed tape, that tape's key before)
        self.saved: list[tuple[TapedLayer, Optional[RoutingTape], Optional[str], RoutingTape, Hashable]] = []
        self.counting = uncounted()

    def __enter__(self) -> None:
        self.counting.__enter__()
        for layer in self.layers:
            tape, key = self.taken[id(layer)]
            self.saved.append((layer, layer.tape, layer.tape_mode, tape, tape.micro_batch))
            layer.tape, layer.tape_mode = tape, "pinned"
            tape.micro_batch = key

    def __exit__(self, *exc: Any) -> None:
        for layer, tape, mode, replayed, key in reversed(self.saved):
            replayed.micro_batch = key
            layer.tape, layer.tape_mode = tape, mode
        self.saved.clear()
        self.counting.__exit__(*exc)


def checkpointed(fn: Callable[..., Any], moe_layers: Sequence[TapedLayer], *args: Any) -> Any:
    """fn(*args), its activations recomputed in backward, the MoE layers inside it replaying their routing."""
    taken: dict[int, tuple[RoutingTape, Hashable]] = {}
    return checkpoint(
        fn,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=lambda: (_PinRouting(moe_layers, taken), _ReplayPinned(moe_layers, taken)),
    )


def recomputes(module: torch.nn.Module) -> bool:
    """Checkpointing applies in training with gradients on (evaluation and generation keep nothing for backward)."""
    return module.training and torch.is_grad_enabled()
