"""Expert pruning: remove routed experts, and the router's rows with them, from a model.

Which experts to keep is the caller's (moe_lab/tools/prune.py scores them); here is only the surgery, which
follows the shape legend: every parameter or buffer of an MoE layer's experts and router whose shape suffix begins
with E (`w_in_EGFD`, `gate_ED`, `bias_E`, `gate_bias_E`, `noise_ED`, ...) holds one row per routed expert, and keeps
the rows of the kept experts, in their old order. The router then chooses among the kept experts only: for a softmax
gate that is the softmax over the remaining logits, for a sigmoid gate with a correction bias the remaining scores
and biases. Routers with expert groups (DeepSeek-V3's group-limited routing, hierarchical gating) keep the same
number of experts in every group, so that the groups stay whole and equal (llm-compressor #2828). Routers that
route by a fixed table (hash, domain oracle) have no gate to re-route the tokens of a removed expert, and are refused.

A pruned model is an ordinary model: the same settings but `num_experts` (and `layer_experts` where the layers keep
different numbers), and a checkpoint like any other.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch

from moe_lab.model.gpt import MoETransformer
from moe_lab.model.moe import MoELayer


def per_expert(name: str) -> bool:
    """Whether a tensor holds one row per routed expert, by its name's shape suffix (`w_in_EGFD`: yes)."""
    leaf = name.rsplit(".", 1)[-1]
    return "_" in leaf and leaf.rsplit("_", 1)[1].startswith("E")


def check_prunable(layer: MoELayer, keep: Sequence[int]) -> None:
    """ValueError unless `keep` is a valid set of experts to keep in this layer."""
    E = layer.num_experts
    router = layer.router
    if not router.has_gate:
        raise ValueError(
            f"router={router.registered_name} routes by a fixed table, with no gate to send a removed expert's "
            "tokens elsewhere: it cannot be pruned"
        )
    if layer.experts.is_sharded:
        raise ValueError("prune a model that holds all its experts (not an expert-parallel shard)")
    if len(set(keep)) != len(keep) or not all(0 <= e < E for e in keep):
        raise ValueError(f"layer {layer.layer}: the experts to keep must be distinct, in 0..{E - 1}: {list(keep)}")
    groups = router.cfg.expert_groups()
    if groups > 1:
        size = E // groups
        per_group = [sum(1 for e in keep if e // size == g) for g in range(groups)]
        if len(set(per_group)) != 1:
            raise ValueError(
                f"layer {layer.layer}: router={router.registered_name} chooses among {groups} groups of {size} "
                f"experts; keep as many of each (kept per group: {per_group})"
            )
    router.cfg.check(len(keep))  # e.g. top_k at most the experts left


def pruned_layer(layer: MoELayer, keep: Sequence[int]) -> MoELayer:
    """A copy of `layer` with only the experts `keep` (their router rows included), in ascending order."""
    check_prunable(layer, keep)
    kept = torch.tensor(sorted(keep), dtype=torch.long)
    cfg = dataclasses.replace(layer.cfg, num_experts=len(kept), router=copy.deepcopy(layer.router.cfg))
    new = copy.deepcopy(layer)
    new.cfg, new.num_experts = cfg, len(kept)
    new.router.cfg, new.router.num_experts = cfg.router, len(kept)
    new.router.top_k = cfg.router.experts_per_token(len(kept))
    new.top_k = new.router.top_k
    new.experts.num_experts = new.experts.total_experts = len(kept)
    for holder in (new.experts, new.router):
        for name, tensor in list(holder.named_parameters(recurse=False)) + list(holder.named_buffers(recurse=False)):
            if per_expert(name):
                rows = tensor.data.index_select(0, kept.to(tensor.device)).clone()
                if isinstance(tensor, torch.nn.Parameter):
                    setattr(holder, name, torch.nn.Parameter(rows, requires_grad=tensor.requires_grad))
                else:
                    setattr(holder, name, rows)
    return new


def prune_experts(model: MoETransformer, keep: dict[int, Sequence[int]]) -> MoETransformer:
    """A new model keeping, in every MoE layer L, the experts `keep[L]`; the model itself is left as it was. Its
    settings differ from the model's in num_experts (the most any layer kept) and, where the layers kept different
    numbers, layer_experts; it holds exactly what a model built from them holds (checked)."""
    layers = {m.layer: m for m in model.moe_modules()}
    if set(keep) != set(layers):
        raise ValueError(f"give the experts to keep for every MoE layer {sorted(layers)}, not {sorted(keep)}")
    counts = [len(keep[l]) for l in model.moe_layers]
    new_layers = {l: pruned_layer(layer, keep[l]) for l, layer in layers.items()}
    cfg = copy.deepcopy(model.cfg)
    cfg.moe = dataclasses.replace(
        cfg.moe,
        num_experts=max(counts),
        layer_experts=None if len(set(counts)) == 1 else counts,
        router=new_layers[min(new_layers)].cfg.router,
    )
    pruned = MoETransformer(cfg)  # the structure of a model of these settings, to check the surgery against
    state = {k: v for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            prefix = f"{name}."
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
            state.update({prefix + k: v for k, v in new_layers[module.layer].state_dict().items()})
    pruned.load_state_dict(state, strict=True)
    pruned.checkpoint_step = model.checkpoint_step
    return pruned.train(model.training)
