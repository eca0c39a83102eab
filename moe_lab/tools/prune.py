"""`moe-lab prune CKPT OUT_DIR --keep N --criterion C [data=...]`: keep the N best routed experts of every MoE layer.

The experts are scored on the held-out blocks of the data (as `moe-lab eval` reads them, with the model's own
tokenizer), dropless, by one of:

    frequency  the share of routing slots that chose the expert
    reap       Router-weighted Expert Activation Pruning (Lasby et al. 2025, llm-compressor #2864): the mean, over
               the tokens routed to expert j, of its gate weight times the norm of its output,
               (1/N_j) sum g_j(t) ||f_j(t)||.
               The gate weight is the combine weight, which for a router with a correction bias (aux_free) is the
               score before the bias, as DeepSeek-V3 weights (reap-mlx #46)
    ean        Expert Activation Norm (Jaiswal et al. 2025): the sum over the tokens routed to j of ||f_j(t)||
    loss       the held-out loss of the model without the expert (its tokens re-routed to the others), measured for
               every expert of every layer: L x E passes over the data, so it wants a small --max-batches
    random     a uniformly random choice (the baseline every criterion must beat; --seed)

f_j(t) is the expert's output before it is weighted (for latent experts, in the latent width). The pruned model
(moe_lab/model/pruning.py) is written as OUT_DIR/model.ckpt (with the tokenizer folder of an imported model), a
checkpoint like any other: it evaluates, generates, is analysed, fine-tunes (`moe-lab train ckpt_path=...`) and
exports. OUT_DIR/pruning.json holds every expert's score and the experts kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from moe_lab.errors import UserError
from moe_lab.model import MoELayer, MoETransformer
from moe_lab.model.pruning import check_prunable, prune_experts, pruned_layer

CRITERIA = ("frequency", "reap", "ean", "loss", "random")
LOSS_WITH_GROUPS = (
    "--criterion loss removes one expert at a time, which leaves router={router}'s groups of experts unequal; use "
    "reap, ean, frequency or random with group-limited routing"
)


@dataclasses.dataclass
class ExpertStats:
    """Per layer and expert, over the calibration tokens: routed slots, sum of gate x output norm, sum of norms."""

    slots_LE: np.ndarray
    gated_norm_LE: np.ndarray
    norm_LE: np.ndarray

    @classmethod
    def zeros(cls, layers: int, experts: int) -> "ExpertStats":
        return cls(*(np.zeros((layers, experts)) for _ in range(3)))


@contextlib.contextmanager
def expert_outputs_recorded(model: MoETransformer, stats: ExpertStats) -> Iterator[None]:
    """While inside, every forward adds each MoE layer's per-expert slots and output norms to `stats`."""
    hooks = [layer.register_forward_hook(_recorder(stats, l)) for l, layer in enumerate(model.moe_modules())]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _recorder(stats: ExpertStats, l: int) -> Callable[..., None]:
    @torch.no_grad()
    def record(layer: MoELayer, args: tuple, output: tuple) -> None:
        x_TD = args[0].reshape(-1, args[0].shape[-1])
        z_TL = x_TD if layer.latent_down is None else layer.latent_down(x_TD)
        out = output[1]
        for e in range(layer.num_experts):  # a reference loop: analyses favour plain code over speed
            mine = out.expert_N == e
            if not bool(mine.any()):
                continue
            norms = layer.experts.expert_forward(e, z_TL[out.token_N[mine]]).float().norm(dim=-1)
            stats.slots_LE[l, e] += float(mine.sum())
            stats.gated_norm_LE[l, e] += float((out.weight_N[mine].float() * norms).sum())
            stats.norm_LE[l, e] += float(norms.sum())

    return record


@torch.no_grad()
def held_out_loss(model: MoETransformer, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over the (B, S + 1) blocks."""
    nats, tokens = 0.0, 0
    for ids in batches:
        logits = model(ids[:, :-1]).logits
        nats += float(F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        tokens += ids[:, 1:].numel()
    return nats / max(tokens, 1)


@torch.no_grad()
def removal_losses(
    model: MoETransformer, batches: list[torch.Tensor], progress: Optional[Callable[[int, int], None]] = None
) -> np.ndarray:
    """(L, E): the held-out loss with each expert of each layer removed alone (the others as they are)."""
    layers = model.moe_modules()
    E = model.cfg.moe.num_experts
    if layers and layers[0].router.cfg.expert_groups() > 1:
        raise ValueError(LOSS_WITH_GROUPS.format(router=layers[0].router.registered_name))
    losses = np.zeros((len(layers), E))
    holders = [block for block in model.all_blocks() if isinstance(block.ffn, MoELayer)]
    for l, block in enumerate(holders):
        layer = block.ffn
        for e in range(E):
            block.ffn = pruned_layer(layer, [x for x in range(E) if x != e])
            try:
                losses[l, e] = held_out_loss(model, batches)
            finally:
                block.ffn = layer
            if progress is not None:
                progress(l * E + e + 1, len(layers) * E)
    return losses


def scores(
    criterion: str,
    model: MoETransformer,
    batches: list[torch.Tensor],
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> np.ndarray:
    """(L, E) scores, higher = keep."""
    L, E = len(model.moe_layers), model.cfg.moe.num_experts
    if criterion == "random":
        return np.random.default_rng(seed).random((L, E))
    if criterion == "loss":
        return removal_losses(model, batches, progress)  # a large loss without it: keep it
    stats = ExpertStats.zeros(L, E)
    with expert_outputs_recorded(model, stats), torch.no_grad():
        for n, ids in enumerate(batches):
            model(ids[:, :-1])
            if progress is not None:
                progress(n + 1, len(batches))
    if criterion == "frequency":
        return stats.slots_LE / np.maximum(stats.slots_LE.sum(1, keepdims=True), 1)
    if criterion == "reap":
        return stats.gated_norm_LE / np.maximum(stats.slots_LE, 1)
    if criterion == "ean":
        return stats.norm_LE
    raise ValueError(f"no criterion {criterion!r}; the criteria are {', '.join(CRITERIA)}")


def experts_to_keep(scores_LE: np.ndarray, keep: int, groups: int = 1) -> list[list[int]]:
    """Per layer, the `keep` experts of highest score (ties: the lower index), as many from each of `groups` groups
    of consecutive experts; ascending."""
    L, E = scores_LE.shape
    size = E // groups
    kept = []
    for l in range(L):
        chosen: list[int] = []
        for g in range(groups):
            members = np.arange(g * size, (g + 1) * size)
            order = members[np.lexsort((members, -scores_LE[l, members]))]
            chosen += order[: keep // groups].tolist()
        kept.append(sorted(chosen))
    return kept


def check_keep(model: MoETransformer, keep: int, criterion: str = "reap") -> None:
    """UserError, before any work, unless every MoE layer can keep `keep` experts scored by `criterion`."""
    if not model.moe_layers:
        raise UserError("the model is dense: there are no experts to prune")
    E = model.cfg.moe.num_experts
    if not 1 <= keep < E:
        raise UserError(f"--keep {keep}: keep 1 to {E - 1} of the model's {E} experts per layer")
    layer = model.moe_modules()[0]
    groups = layer.router.cfg.expert_groups()
    if criterion == "loss" and groups > 1:
        raise UserError(LOSS_WITH_GROUPS.format(router=layer.router.registered_name))
    if keep % groups:
        raise UserError(
            f"--keep {keep}: router={layer.router.registered_name} chooses among {groups} groups of {E // groups} "
            f"experts; keep a multiple of {groups} (as many in every group)"
        )
    size = E // groups
    try:
        for moe in model.moe_modules():
            check_prunable(moe, [g * size + i for g in range(groups) for i in range(keep // groups)])
    except ValueError as e:
        raise UserError(f"--keep {keep}: {e}") from None


# ------------------------------------------------------------------------------------------------------------
# The command


def run(args: Any, cfg: Any) -> int:
    """`moe-lab prune` with its parsed arguments and composed data settings: score, prune, write, say what it did."""
    from moe_lab.tools.evaluate import held_out_data
    from moe_lab.tools.generate import load_for_inference

    out = Path(args.out_dir).expanduser()
    model, tokenizer, described = load_for_inference(args.source)
    check_keep(model, args.keep, args.criterion)
    model = model.to(args.device)
    run_cfg, data, loader = held_out_data(cfg, tokenizer, model.cfg, args.max_batches)
    batches = [batch["input_ids"][batch["valid"].bool()].to(args.device) for batch in loader]
    batches = [ids for ids in batches if len(ids)]
    if not batches:
        raise UserError("no held-out data to score the experts on")
    print(
        f"moe-lab: scoring the experts of {described} by {args.criterion} on {data.describe()}: "
        f"{sum(len(b) for b in batches)} blocks of {run_cfg.data.seq_len} tokens",
        file=sys.stderr,
        flush=True,
    )
    scores_LE = scores(args.criterion, model, batches, seed=args.seed, progress=_progress)
    print(file=sys.stderr)
    kept = experts_to_keep(scores_LE, args.keep, model.moe_modules()[0].router.cfg.expert_groups())
    pruned = prune_experts(model.cpu(), dict(zip(model.moe_layers, kept)))
    before = held_out_loss(model.to(args.device), batches)
    after = held_out_loss(pruned.to(args.device), batches)
    report = {
        "source": args.source,
        "criterion": args.criterion,
        "data": data.describe(),
        "num_experts": model.cfg.moe.num_experts,
        "kept": args.keep,
        "loss_before": before,
        "loss_after": after,
        "layers": {
            str(layer): {"scores": scores_LE[l].tolist(), "kept": kept[l]} for l, layer in enumerate(model.moe_layers)
        },
    }
    write_pruned(pruned.cpu(), args.source, out, report)
    params = pruned.num_params()
    print(
        f"moe-lab: kept {args.keep} of {model.cfg.moe.num_experts} experts per layer by {args.criterion}: "
        f"{params['total'] / 1e6:.2f}M parameters ({params['active'] / 1e6:.2f}M active); held-out loss "
        f"{before:.4f} -> {after:.4f}\n  wrote {out / 'model.ckpt'} and {out / 'pruning.json'}\n"
        f"  evaluate   moe-lab eval {out / 'model.ckpt'}\n"
        f"  fine-tune  moe-lab train ckpt_path={out / 'model.ckpt'} ..."
    )
    return 0


def _progress(done: int, total: int) -> None:
    print(f"\rmoe-lab: {done}/{total}", end="", file=sys.stderr, flush=True)


def write_pruned(model: MoETransformer, source: str, out: Path, report: dict[str, Any]) -> None:
    """OUT_DIR/model.ckpt (weights, settings, tokenizer, where it came from), OUT_DIR/pruning.json, and an imported
    model's tokenizer folder."""
    from moe_lab.files import write_atomically
    from moe_lab.interop.huggingface import model_overrides
    from moe_lab.training.checkpoint import (
        checkpoint_tokenizer,
        is_checkpoint,
        read_checkpoint,
        tokenizer_identity,
        with_checksum,
    )

    source_path = Path(source).expanduser()
    tok: dict[str, Any] = {"name": "bytes", "eos_token": None}
    hyper: dict[str, Any] = {"optim": {}, "domain_names": ["all"], "seed": 0}
    if is_checkpoint(source_path):
        ckpt = read_checkpoint(source_path, weights=False)
        hyper.update({k: v for k, v in ckpt["hyper_parameters"].items() if k in ("domain_names", "seed")})
        tok = dict(ckpt["hyper_parameters"].get("tokenizer") or tok)
        beside = source_path.parent / "tokenizer"
    else:
        beside = source_path if source_path.is_dir() else Path()
    out.mkdir(parents=True, exist_ok=True)
    if (beside / "tokenizer.json").is_file():  # an imported model's (or a Hugging Face folder's) own tokenizer
        (out / "tokenizer").mkdir(exist_ok=True)
        for p in beside.iterdir():
            if p.is_file() and (p.name.startswith("tokenizer") or p.name == "special_tokens_map.json"):
                shutil.copyfile(p, out / "tokenizer" / p.name)
        tok["name"] = str((out / "tokenizer").resolve())
    ckpt_out = {
        "hyper_parameters": {**hyper, "model": dataclasses.asdict(model.cfg), "tokenizer": tok},
        "state_dict": {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
        "global_step": 0,
        "epoch": 0,
        "moe_lab_pruned": {
            "source": str(source),
            "criterion": report["criterion"],
            "kept": {layer: entry["kept"] for layer, entry in report["layers"].items()},
        },
        "moe_lab_run": {
            "overrides": model_overrides(model.cfg, tok),
            "run_dir": None,
            "tokenizer": tokenizer_identity(checkpoint_tokenizer(out / "model.ckpt", tok)),
        },
    }
    write_atomically(out / "model.ckpt", lambda f: torch.save(with_checksum(ckpt_out), f))
    write_atomically(out / "pruning.json", json.dumps(report, indent=2) + "\n")
