"""Expert parallelism: the process groups, the all-to-all token exchange, and the expert-shard bookkeeping.

With `model.moe.expert_parallel = P` on W ranks, consecutive ranks form expert-parallel (EP) groups of P; each rank
of an EP group holds E / P of every MoE layer's experts, and tokens travel to their experts' rank and back with
`all_to_all`. Ranks that hold the same experts (one per EP group, W / P of them) form an expert-data-parallel (EDP)
group, over which those experts' gradients are averaged. Dense and router parameters are averaged over all W ranks by
DDP, which is told to leave the expert parameters alone.

    W = 8, P = 4:   EP groups [0 1 2 3] [4 5 6 7]       EDP groups [0 4] [1 5] [2 6] [3 7]

Shape legend: as `moe.py`, plus P ranks per EP group and El = E / P local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The named process groups of expert parallelism, built once per process."""

    ep_size: int  # P: ranks sharing one copy of the experts
    ep_rank: int  # this rank's place in its EP group: it holds experts [ep_rank * El, (ep_rank + 1) * El)
    ep_group: Optional[dist.ProcessGroup]  # this rank's EP group (token exchange, expert-shard gathers)
    edp_group: Optional[dist.ProcessGroup]  # ranks holding the same experts (expert-gradient averaging)
    edp_size: int
    world_size: int


_GROUPS: Optional[ExpertParallelGroups] = None


def init_expert_parallel(ep_size: int) -> ExpertParallelGroups:
    """Build (once) the EP and EDP groups of this process; every rank must call it, in the same order."""
    global _GROUPS
    if _GROUPS is not None:
        if _GROUPS.ep_size != ep_size:
            raise RuntimeError(f"expert parallelism was set up with {_GROUPS.ep_size} ranks, not {ep_size}")
        return _GROUPS
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"model.moe.expert_parallel={ep_size} needs torch.distributed: train with trainer=ddp")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise RuntimeError(f"model.moe.expert_parallel={ep_size} must divide the world size {world}")
    ep_group = edp_group = None
    for start in range(0, world, ep_size):  # every rank creates every group, as torch.distributed requires
        ranks = list(range(start, start + ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for offset in range(ep_size):
        ranks = list(range(offset, world, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    _GROUPS = ExpertParallelGroups(ep_size=ep_size, ep_rank=rank % ep_size, ep_group=ep_group, edp_group=edp_group,
                                   edp_size=world // ep_size, world_size=world)
    return _GROUPS


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward pass sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x[in_splits[0] rows] go to rank 0 of `group`, the next in_splits[1] to rank 1, ...; differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """(P, *x.shape): x from every rank of `group`, in rank order (not differentiable)."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def expert_parameter_names(module: torch.nn.Module) -> list[str]:
    """Names (relative to `module`) of the expert weights that live on one EP rank only."""
    from moe_lab.model.experts import GroupedExperts

    names = []
    for name, sub in module.named_modules():
        if isinstance(sub, GroupedExperts) and getattr(sub, "ep_group", None) is not None:
            names += [f"{name}.w_in_EGFD", f"{name}.w_out_EDF"]
    return names


def make_ddp_strategy(**kwargs):
    """Lightning's DDP, told to leave expert shards out of its gradient all-reduce and parameter broadcast (their
    gradients are averaged over the expert-data-parallel group instead), and not to broadcast buffers: moe-lab's
    buffers are either constant or updated identically on every rank, and aux-free routers accumulate per-rank
    counts in one between optimizer steps."""
    from lightning.pytorch.strategies import DDPStrategy

    class MoEDDPStrategy(DDPStrategy):
        def _setup_model(self, model: torch.nn.Module):
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, expert_parameter_names(model))
            return super()._setup_model(model)

    kwargs.setdefault("broadcast_buffers", False)
    return MoEDDPStrategy(**kwargs)
