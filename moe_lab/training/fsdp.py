"""`trainer=fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) for the dense weights, beside expert parallelism.

Under DDP every rank holds every dense weight (attention, embeddings, norms, routers, shared experts) with its float32
gradient and AdamW's two moments: 16 bytes a parameter, replicated W times. Here they are sharded over all W ranks,
as torchtitan composes FSDP2 with expert parallelism:

    W ranks, expert parallel P:
        dense weights, gradients, AdamW moments   sharded over the W ranks (Shard(0) DTensors): one FSDP unit per
                                                  block and one for the rest
        routed experts, theirs                    E / P per rank, as under DDP (MoEDDPStrategy), and those sharded
                                                  over the W / P ranks that hold the same ones (EDP), one FSDP unit
                                                  per bank: each rank holds 1 / W of everything

A block's weights are gathered for its forward and again for its backward (and dropped after each), and its
gradients reduce-scattered: the mean over ranks that DDP's all-reduce gives. Under `bf16-mixed` the forward runs
in bfloat16 by autocast while the weights, their gradients and the reduce-scatter stay float32.

Checkpoints are those of DDP, in either format. The sharded one (checkpoint.format=sharded; auto under expert
parallelism) is written from the shards as they are, no rank gathering anything: the dense weights and moments as
FSDP's DTensors, each rank its shard; an expert bank sharded over its EDP ranks on an (EP, EDP) mesh of the same ranks
(`ShardLayout`), so that the checkpoint holds every expert once, in order. A load reads each rank's shard only. The
one-file format gathers the dense part whole on every rank for the moment of the save and rank 0 writes it. Either
resumes under DDP, another FSDP size or one process, and the other way round.

An expert's gradient holds the sum over its expert-parallel group's tokens (the all-to-all's backward brought it
home); the reduce-scatter over its EDP ranks averages it there, and dividing by P gives DDP's sum over EDP / W.
With W = P (no EDP) the experts are not FSDP's and are reduced as under DDP.

`compile=true` compiles the model FSDP2 shards (torch.compile runs FSDP's hooks eagerly around the compiled code, its
all-gathers and reduce-scatters included): measured on the float32 CPU path beside expert parallel 1, where
compile=true is allowed (it is refused under expert parallelism).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.tensor import DTensor, distribute_tensor

from moe_lab.model import MoETransformer
from moe_lab.model.experts import GroupedExperts
from moe_lab.training.strategy import MoEDDPStrategy


def shard_dense(model: MoETransformer, mesh: Any) -> None:
    """fully_shard every block of `model` and then the model itself over `mesh`, leaving out the routed experts
    that are not sharded already (`shard_experts`)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    experts = {
        p
        for bank in model.modules()
        if isinstance(bank, GroupedExperts) and not isinstance(bank, FSDPModule)
        for p in bank.parameters()
    }
    for block in model.all_blocks():
        fully_shard(block, mesh=mesh, ignored_params=experts & set(block.parameters()))
    fully_shard(model, mesh=mesh, ignored_params=experts)


def shard_experts(banks: list[GroupedExperts], edp_mesh: Any) -> None:
    """fully_shard each expert bank over the ranks that hold the same experts (their gradients averaged there; the
    strategy scales them to DDP's, `reduce_expert_gradients`)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for bank in banks:
        fully_shard(bank, mesh=edp_mesh)
        register_fsdp_forward_method(bank, "forward_in_parts")  # deterministic expert parallelism calls this


def whole(value: Any) -> Any:
    """`value` with every DTensor in it gathered whole (a collective: every rank calls it)."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    return value


def shard_like(value: Any, param: DTensor) -> Any:
    """This rank's shard of a whole tensor shaped as `param` (a slice of it, no communication); anything else as it
    is (Adam's step count)."""
    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


class MoEFSDPStrategy(MoEDDPStrategy):
    """moe-lab's DDP strategy with the dense part sharded by FSDP2 (see the module docstring)."""

    expert_mesh: Any = None  # (EP, EDP): the experts' FSDP shards in a sharded checkpoint

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """A checkpoint is read once the weights are sharded, and each rank keeps its shard of it."""
        return True

    def setup(self, trainer) -> None:
        if self.groups is None:  # expert parallel 1 too: one EDP group of all ranks, for the experts' shards
            self.keep_own_experts()
        from torch.distributed.fsdp import FSDPModule

        if trainer.state.fn == TrainerFn.FITTING or not isinstance(self._moe_module().model, FSDPModule):
            DDPStrategy.setup(self, trainer)  # fit: moves the model, configure_ddp (below), the optimizers
            return
        # A validation after fit (a run's final val/loss): the weights are shards already, each rank's own, which
        # DDP's setup would overwrite with rank 0's.
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        groups = self.groups
        assert groups is not None
        mesh = init_device_mesh(self.root_device.type, (groups.world_size,), mesh_dim_names=("fsdp",))
        if groups.edp_size > 1:  # the experts sharded over the ranks that hold the same ones (EDP)
            self._shard_layout()  # builds the (EDP, EP) mesh
            shard_experts(self._expert_banks(), self.mesh["edp"])
            if groups.ep_size > 1:  # the same ranks as (EP, EDP): how a sharded checkpoint holds those shards
                from torch.distributed.device_mesh import DeviceMesh

                ranks = torch.arange(groups.world_size).reshape(groups.edp_size, groups.ep_size).T
                self.expert_mesh = DeviceMesh(self.root_device.type, ranks, mesh_dim_names=("ep", "edp"))
        shard_dense(self._moe_module().model, mesh)  # the module is trained as it is: no wrapper

    # -- gradients: the experts FSDP does not hold, summed over their EDP group -------------------------------

    def _expert_banks(self) -> list[GroupedExperts]:
        return [m for m in self._moe_module().modules() if isinstance(m, GroupedExperts)]

    def reduce_expert_gradients(self) -> None:
        groups = self.groups
        assert groups is not None
        for bank in self._expert_banks():
            for name in bank.expert_weights:
                grad = getattr(bank, name).grad
                if grad is None:
                    continue
                if isinstance(grad, DTensor):  # FSDP's: reduce-scattered in backward as the mean over EDP ranks,
                    grad.to_local().div_(groups.ep_size)  # so sum / W = mean / P (a gradient-divide factor would
                    continue  # need ReduceOp.PREMUL_SUM, which gloo lacks)
                if groups.edp_size > 1:
                    dist.all_reduce(grad, group=groups.edp_group)
                grad.div_(groups.world_size)

    # -- checkpoints: DDP's, the shards gathered to save and sharded again on load -------------------------------

    def _expert_mesh(self) -> Any:
        return self.expert_mesh

    def _plain(self, values: dict[str, Any]) -> dict[str, Any]:
        return values if self.sharded_checkpoints else whole(values)  # DCP writes each rank's shards as they are

    def _placed(self, values: dict[Any, Any], params: dict[Any, Any]) -> dict[Any, Any]:
        out = {}
        for key, value in values.items():
            param = params.get(key)
            if not isinstance(param, DTensor):
                out[key] = value
            elif isinstance(value, dict):  # an optimizer slot: its moments
                out[key] = {k: shard_like(v, param) for k, v in value.items()}
            else:
                out[key] = shard_like(value, param)
        return out
