"""`moe-lab prune CKPT OUT_DIR --keep N --criterion C [data=...]`: keep the N best routed experts of every MoE layer;
`--keep-total N` instead keeps N over all layers, spread by score, so that the layers keep different numbers.

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

f_j(t) is the expert's output before it is weighted (for latent experts, in the latent width).

A total budget (`--keep-total`) first gives every layer the fewest experts its router can route with (top-k: k),
its best ones, then the rest of the budget to the best remaining experts of any layer, compared by their score
where it means the same in every layer (frequency: a share of the layer's slots; loss: nats; random) and by their
score over their layer's mean where its scale is the layer's own (reap and ean grow with a layer's output norms,
which differ from layer to layer). Group-limited routers keep whole, equal groups, so they prune per layer only.

The pruned model
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
    if layers and layers[0].router.cfg.expert_groups() > 1:
        raise ValueError(LOSS_WITH_GROUPS.format(router=layers[0].router.registered_name))
    losses = np.full((len(layers), model.cfg.moe.num_experts), np.nan)  # nan: no such expert in a narrower layer
    holders = [block for block in model.all_blocks() if isinstance(block.ffn, MoELayer)]
    total, done = sum(m.num_experts for m in layers), 0
    for l, block in enumerate(holders):
        layer = block.ffn
        E = layer.num_experts
        for e in range(E):
            block.ffn = pruned_layer(layer, [x for x in range(E) if x != e])
            try:
                losses[l, e] = held_out_loss(model, batches)
            finally:
                block.ffn = layer
            done += 1
            if progress is not None:
                progress(done, total)
    return losses


def scores(
    criterion: str,
    model: MoETransformer,
    batches: list[torch.Tensor],
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> np.ndarray:
    """(L, E) scores, higher = keep (E: the most experts of any layer; a narrower layer's extra columns are nan)."""
    L, E = len(model.moe_layers), model.cfg.moe.num_experts
    absent_LE = np.arange(E)[None, :] >= np.array([m.num_experts for m in model.moe_modules()])[:, None]
    if criterion == "random":
        return np.where(absent_LE, np.nan, np.random.default_rng(seed).random((L, E)))
    if criterion == "loss":
        return removal_losses(model, batches, progress)  # a large loss without it: keep it
    stats = ExpertStats.zeros(L, E)
    with expert_outputs_recorded(model, stats), torch.no_grad():
        for n, ids in enumerate(batches):
            model(ids[:, :-1])
            if progress is not None:
                progress(n + 1, len(batches))
    if criterion == "frequency":
        found = stats.slots_LE / np.maximum(stats.slots_LE.sum(1, keepdims=True), 1)
    elif criterion == "reap":
        found = stats.gated_norm_LE / np.maximum(stats.slots_LE, 1)
    elif criterion == "ean":
        found = stats.norm_LE
    else:
        raise ValueError(f"no criterion {criterion!r}; the criteria are {', '.join(CRITERIA)}")
    return np.where(absent_LE, np.nan, found)


def experts_to_keep(scores_LE: np.ndarray, keep: int, groups: int = 1) -> list[list[int]]:
    """Per layer, the `keep` experts of highest score (ties: the lower index), as many from each of `groups` groups
    of consecutive experts; ascending. A layer's experts are its columns that are not nan."""
    kept = []
    for row in scores_LE:
        size = int((~np.isnan(row)).sum()) // groups
        chosen: list[int] = []
        for g in range(groups):
            members = np.arange(g * size, (g + 1) * size)
            chosen += best(row, members)[: keep // groups].tolist()
        kept.append(sorted(chosen))
    return kept


def best(row: np.ndarray, members: np.ndarray) -> np.ndarray:
    """`members` by score, highest first (ties: the lower index)."""
    return members[np.lexsort((members, -row[members]))]


def comparable(criterion: str, scores_LE: np.ndarray) -> np.ndarray:
    """Scores that mean the same in every layer, for a total budget: reap and ean over their layer's mean (their
    scale is the layer's output norm), the others as they are."""
    if criterion not in ("reap", "ean"):
        return scores_LE
    return scores_LE / np.maximum(np.nanmean(scores_LE, axis=1, keepdims=True), 1e-12)


def experts_to_keep_total(scores_LE: np.ndarray, total: int, minimum_L: list[int]) -> list[list[int]]:
    """`total` experts over all layers: each layer's `minimum_L[l]` best, then the best of the rest of any layer
    (ties: the earlier layer, then the lower index); per layer, ascending. Scores are comparable across layers."""
    L, E = scores_LE.shape
    kept: list[list[int]] = []
    rest = []  # (score, layer, expert) of every expert not kept yet
    for l, row in enumerate(scores_LE):
        order = best(row, np.flatnonzero(~np.isnan(row)))
        kept.append(order[: minimum_L[l]].tolist())
        rest += [(-row[e], l, e) for e in order[minimum_L[l] :].tolist()]
    for _, l, e in sorted(rest)[: total - sum(minimum_L)]:
        kept[l].append(e)
    return [sorted(k) for k in kept]


def fewest_experts(layer: MoELayer) -> int:
    """The fewest experts this layer's router can route with (top-k: k), as pruning would keep them."""
    for count in range(1, layer.num_experts + 1):
        try:
            check_prunable(layer, list(range(count)))
            return count
        except ValueError:
            continue
    return layer.num_experts


def check_keep(
    model: MoETransformer, keep: Optional[int], criterion: str = "reap", total: Optional[int] = None
) -> None:
    """UserError, before any work, unless every MoE layer can keep `keep` experts scored by `criterion`, or the
    layers `total` experts in all."""
    if not model.moe_layers:
        raise UserError("the model is dense: there are no experts to prune")
    layer = model.moe_modules()[0]
    groups = layer.router.cfg.expert_groups()
    if criterion == "loss" and groups > 1:
        raise UserError(LOSS_WITH_GROUPS.format(router=layer.router.registered_name))
    if total is not None:
        check_total(model, total, groups)
        return
    assert keep is not None
    E = min(m.num_experts for m in model.moe_modules())
    if not 1 <= keep < E:
        raise UserError(f"--keep {keep}: keep 1 to {E - 1} of the model's {E} experts per layer")
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


def check_total(model: MoETransformer, total: int, groups: int) -> None:
    """--keep-total: between the fewest every layer's router can route with and all but one expert."""
    router = model.moe_modules()[0].router
    if groups > 1:
        raise UserError(
            f"--keep-total: router={router.registered_name} chooses among groups of experts, which stay whole and "
            "equal, so every layer keeps the same number: use --keep N"
        )
    first = model.moe_modules()[0]
    try:
        check_prunable(first, list(range(first.num_experts)))  # a router or model that cannot be pruned says why
    except ValueError as e:
        raise UserError(f"--keep-total {total}: {e}") from None
    fewest = sum(fewest_experts(moe) for moe in model.moe_modules())
    have = sum(m.num_experts for m in model.moe_modules())
    if not fewest <= total < have:
        raise UserError(
            f"--keep-total {total}: keep {fewest} (the fewest router={router.registered_name} routes with, in all "
            f"{len(model.moe_layers)} MoE layers) to {have - 1} of the model's {have} experts"
        )


# ------------------------------------------------------------------------------------------------------------
# The command


def run(args: Any, cfg: Any) -> int:
    """`moe-lab prune` with its parsed arguments and composed data settings: score, prune, write, say what it did."""
    from moe_lab.tools.evaluate import held_out_data
    from moe_lab.tools.generate import load_for_inference

    out = Path(args.out_dir).expanduser()
    model, tokenizer, described = load_for_inference(args.source)
    check_keep(model, args.keep, args.criterion, args.keep_total)
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
    if args.keep_total is not None:
        minimum_L = [fewest_experts(moe) for moe in model.moe_modules()]
        kept = experts_to_keep_total(comparable(args.criterion, scores_LE), args.keep_total, minimum_L)
    else:
        kept = experts_to_keep(scores_LE, args.keep, model.moe_modules()[0].router.cfg.expert_groups())
    pruned = prune_experts(model.cpu(), dict(zip(model.moe_layers, kept)))
    before = held_out_loss(model.to(args.device), batches)
    after = held_out_loss(pruned.to(args.device), batches)
    report = {
        "source": args.source,
        "criterion": args.criterion,
        "data": data.describe(),
        "num_experts": [m.num_experts for m in model.moe_modules()],
        "kept": [len(k) for k in kept],
        "loss_before": before,
        "loss_after": after,
        "layers": {
            str(layer): {"scores": scores_LE[l, : m.num_experts].tolist(), "kept": kept[l]}
            for l, (layer, m) in enumerate(zip(model.moe_layers, model.moe_modules()))
        },
    }
    write_pruned(pruned.cpu(), args.source, out, report)
    params = pruned.num_params()
    print(
        f"moe-lab: kept {described_kept(report)} by {args.criterion}: "
        f"{params['total'] / 1e6:.2f}M parameters ({params['active'] / 1e6:.2f}M active); held-out loss "
        f"{before:.4f} -> {after:.4f}\n  wrote {out / 'model.ckpt'} and {out / 'pruning.json'}\n"
        f"  evaluate   moe-lab eval {out / 'model.ckpt'}\n"
        f"  fine-tune  moe-lab train ckpt_path={out / 'model.ckpt'} ..."
    )
    return 0


def described_kept(report: dict[str, Any]) -> str:
    """ "4 of 8 experts per layer", or "10 of 16 experts (per layer: 6, 4)"."""
    kept, had = report["kept"], report["num_experts"]
    if len(set(kept)) == 1 and len(set(had)) == 1:
        return f"{kept[0]} of {had[0]} experts per layer"
    return f"{sum(kept)} of {sum(had)} experts (per layer: {', '.join(map(str, kept))})"


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
