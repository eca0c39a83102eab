"""moe-lab's distributed strategy: Lightning's DDP, plus everything expert parallelism needs.

With `model.moe.expert_parallel = P` on W ranks, consecutive ranks form expert-parallel (EP) groups of P; each rank
of an EP group holds E / P of every MoE layer's experts, and token rows travel to their experts' rank and back by
all-to-all (`moe_lab/model/dispatch.py`). Ranks that hold the same experts (one per EP group, W / P of them) form an
expert-data-parallel (EDP) group.

    W = 8, P = 4:   EP groups [0 1 2 3] [4 5 6 7]       EDP groups [0 4] [1 5] [2 6] [3 7]

This strategy owns all of it:
    - the start: the ranks meet within `rendezvous_timeout_s`, and Ctrl-C or SIGTERM while they wait ends the run in
      one line (`rendezvous.py`), never a hang;
    - the process groups, built once per process, and the sharding of the experts before DDP and the optimizer exist;
    - gradients: DDP averages the dense and router gradients over all W ranks and is told to leave the expert shards
      alone; an expert shard's gradient already holds the sum over its EP group's tokens (the all-to-all's backward
      brought it home), so it is summed over the EDP group and divided by W: the same mean-over-ranks loss as DDP's;
    - clipping by the norm of the whole model, computed the same way at any layout (`clip_grad_norm_`), so every
      rank of every layout scales by the same factor;
    - checkpoints that do not depend on the layout, in either of two formats: sharded (`checkpoint.format=auto`, the
      default under expert parallelism), a torch.distributed.checkpoint folder in which each rank writes its own
      experts and Adam moments and none gathers them (`sharded_checkpoint.py`); or one file, for which saving
      gathers every expert and its moments into rank 0. Loading either keeps this rank's slice, so a checkpoint
      written under any P resumes or evaluates under any other.
Without expert parallelism it is Lightning's DDP with `broadcast_buffers=False` (moe-lab's buffers are constant or
updated identically on every rank; aux-free routers keep per-rank counts in one between optimizer steps).

Shape legend: E experts, El = E / P experts per rank, P ranks per EP group.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.tensor import DTensor

from moe_lab.model.experts import GroupedExperts
from moe_lab.training.rendezvous import end_process, watched_rendezvous
from moe_lab.training.run_dir import launched_worker
from moe_lab.training.sharded_checkpoint import ShardedWriter, ShardLayout, is_sharded_checkpoint, read_sharded


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The named process groups of expert parallelism, built once per process."""

    ep_size: int  # P: ranks sharing one copy of the experts
    ep_rank: int  # this rank's place in its EP group: it holds experts [ep_rank * El, (ep_rank + 1) * El)
    ep_group: Optional[dist.ProcessGroup]  # this rank's EP group (token exchange, expert gathers)
    edp_group: Optional[dist.ProcessGroup]  # ranks holding the same experts (expert-gradient sums)
    edp_size: int
    world_size: int


_GROUPS: dict[int, ExpertParallelGroups] = {}


def expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """The EP and EDP groups of this process (built on first use; every rank must call in the same order)."""
    if ep_size in _GROUPS:
        return _GROUPS[ep_size]
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(
            f"model.moe.expert_parallel={ep_size} must divide the world size {world} "
            "(trainer.devices x trainer.num_nodes)"
        )
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
    _GROUPS[ep_size] = ExpertParallelGroups(
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        ep_group=ep_group,
        edp_group=edp_group,
        edp_size=world // ep_size,
        world_size=world,
    )
    return _GROUPS[ep_size]


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """(P, *x.shape): x from every rank of `group`, in rank order (not differentiable)."""
    size = dist.get_world_size(group)
    x = x.contiguous().reshape(-1) if x.ndim == 0 else x.contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))  # the ranks' tensors concatenated along the first dim
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, x, group=group)
    return out.view(size, *x.shape)


def clip_grad_norm_(
    module: torch.nn.Module, max_norm: float, ep_group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Scale every gradient of `module` so their global L2 norm is at most `max_norm` (as
    torch.nn.utils.clip_grad_norm_), with the norm computed the same way, bit for bit, at any expert-parallel size:
    an expert weight's squared norm is the sum of its per-expert squared norms, and under expert parallelism (where
    a rank holds a slice of the experts) those are gathered from the `ep_group` first, so every rank of every layout
    sums the same numbers in the same order and scales by the same factor. Under FSDP (trainer=fsdp) a gradient is
    a shard: the shards' squared sums are summed over their ranks (up to float rounding, the same norm). Returns the
    norm."""
    terms, grads, shards, seen = [], [], [], set()
    mesh = None
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if param.grad is None or id(param) in seen:  # a tied weight counts once
                continue
            seen.add(id(param))
            if isinstance(param.grad, DTensor):
                mesh = param.grad.device_mesh
                grads.append(param.grad.to_local())
                shards.append(grads[-1].float().square().sum())
                continue
            grads.append(param.grad)
            g = param.grad.float()
            if isinstance(sub, GroupedExperts) and name in sub.expert_weights:
                per_expert = g.flatten(1).square().sum(1)
                if sub.is_sharded:
                    per_expert = all_gather(per_expert, ep_group).flatten()
                terms.append(per_expert.sum())
            else:
                terms.append(g.square().sum())
    if shards and mesh is not None:
        sharded = torch.stack(shards).sum()
        dist.all_reduce(sharded, group=mesh.get_group())
        terms.append(sharded)
    if not terms:
        return torch.zeros(())
    total = torch.stack(terms).sum().sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for grad in grads:
        grad.mul_(scale)
    return total


class MoEDDPStrategy(DDPStrategy):
    """Lightning's DDP with expert parallelism (see the module docstring). `expert_parallel=1` is plain DDP."""

    def __init__(
        self,
        expert_parallel: int = 1,
        sharded_checkpoints: bool = False,
        async_save: bool = False,
        rendezvous_timeout_s: float = 600.0,
        run_dir: Optional[Path] = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("broadcast_buffers", False)
        super().__init__(**kwargs)
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.run_dir = run_dir  # given back if the ranks never meet
        self.expert_parallel = expert_parallel
        self.sharded_checkpoints = sharded_checkpoints
        self.sharded_writer = ShardedWriter(async_save, on_saved=self._saved)
        self.groups: Optional[ExpertParallelGroups] = None
        self.mesh: Any = None  # the (EDP, EP) device mesh of sharded checkpoints

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Under expert parallelism, a checkpoint is read once the experts are sharded, so that a sharded one is read
        as this rank's slices only."""
        return self.expert_parallel > 1

    # -- start: every rank meets the others, or the run ends in one line ------------------------------------------

    def setup_distributed(self) -> None:
        world = self.num_nodes * self.num_processes
        if world <= 1 or dist.is_initialized():
            return super().setup_distributed()
        nodes = f" x trainer.num_nodes={self.num_nodes}" if self.num_nodes > 1 else ""
        waiting_for = f"the {world} processes of this run (trainer.devices={self.num_processes}{nodes})"
        speaks = self.local_rank == 0  # one line per node
        if speaks and self.num_nodes > 1:
            env = self.cluster_environment
            where = f"{env.main_address}:{env.main_port}" if env is not None else "the head node"
            print(
                f"moe-lab: waiting up to {self.rendezvous_timeout_s:g} s for {waiting_for} to meet at {where}",
                file=sys.stderr,
                flush=True,
            )
        launcher_children = getattr(self.launcher, "procs", [])

        def give_up(line: str, exit_code: int) -> None:
            run_dir = None if launched_worker() else self.run_dir  # rank 0 claimed it
            end_process(line, exit_code, launcher_children, run_dir, speaks)

        # The ranks beside rank 0 on a node wait a little longer, so that the one that speaks ends them.
        timeout = self.rendezvous_timeout_s + (0 if speaks else 10)
        with watched_rendezvous(timeout, waiting_for, give_up):
            super().setup_distributed()
            self.barrier("rendezvous")  # NCCL connects lazily: the first collective is where ranks meet

    # -- setup: shard the experts before DDP wraps the model and the optimizer sees its parameters --------------

    def setup(self, trainer) -> None:
        if self.expert_parallel > 1 and self.groups is None:
            self.keep_own_experts()
        super().setup(trainer)

    def keep_own_experts(self) -> None:
        """Build the process groups and keep this rank's experts (expert parallel 1: every expert)."""
        self.groups = expert_parallel_groups(self.expert_parallel)
        if self.expert_parallel == 1:
            return
        module = self._moe_module()
        module.model.use_expert_parallel(self.groups.ep_group, self.groups.ep_rank, self.groups.ep_size)
        self._load_starting_weights()
        # DDP (and Lightning's state sync outside fit) broadcasts rank 0's parameters: never the expert shards.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, [name for name, _, _ in self._expert_shards()]
        )

    def _load_starting_weights(self) -> None:
        """A run that starts from other weights (a checkpoint, model.init_from): each rank copies in its experts' rows
        of them and never reads the others' (a sharded checkpoint is read as the rank's part; a file is mapped)."""
        module = self._moe_module()
        if module.starting_weights is None:
            return
        (read, source), module.starting_weights = module.starting_weights, None
        module.load_weights(own_rows(module, read(self._shard_layout())), source)

    def _expert_shards(self) -> Iterator[tuple[str, torch.nn.Parameter, GroupedExperts]]:
        return expert_shards(self._moe_module())

    # -- gradients ----------------------------------------------------------------------------------------------

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        """Expert gradients are reduced right after the backward pass (the closure), before the
        on_before_optimizer_step hooks and gradient clipping see them."""
        if self.groups is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_reduce() -> Any:
            result = closure()
            self.reduce_expert_gradients()
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    def _moe_module(self) -> Any:
        """The LightningModule this strategy trains (moe-lab's: it holds `model`, an MoETransformer)."""
        module = self.lightning_module
        assert module is not None, "the strategy has no module before setup"
        return module

    def reduce_expert_gradients(self) -> None:
        groups = self.groups
        if groups is None:
            return
        for _, param, _ in self._expert_shards():
            if param.grad is not None:
                if groups.edp_size > 1:
                    dist.all_reduce(param.grad, group=groups.edp_group)
                param.grad.div_(groups.world_size)

    # -- checkpoints hold every expert, whatever the layout ------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if not self.sharded_checkpoints:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        self.sharded_writer.save(checkpoint, filepath, self._shard_layout())  # every rank writes its own part

    def _saved(self, path) -> None:
        if hasattr(self.checkpoint_io, "last_saved"):
            self.checkpoint_io.last_saved = path  # the newest checkpoint written whole (AtomicCheckpointIO)

    def teardown(self) -> None:
        self.sharded_writer.wait()  # a background save finishes before the run ends
        super().teardown()

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not is_sharded_checkpoint(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return read_sharded(checkpoint_path, self._shard_layout())

    def _shard_layout(self) -> Optional[ShardLayout]:
        """How the tensors this rank holds sit in a checkpoint's whole ones: its experts' rows, FSDP's shards (None
        without the process groups, i.e. outside expert parallelism and trainer=fsdp)."""
        if self.groups is None:
            return None
        if self.mesh is None:  # built at the first save or load, which every rank reaches together (a collective)
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(
                self.root_device.type,
                (self.groups.edp_size, self.groups.ep_size),
                mesh_dim_names=("edp", "ep"),  # rows are EP groups of consecutive ranks, as above
            )
        banks = {name: experts for name, _, experts in self._expert_shards()}
        params = dict(self._moe_module().named_parameters())
        names = {id(param): name for name, param in params.items()}
        slots = [
            {slot: names.get(param_id) for param_id, slot in self._optimizer_slots(opt).items()}
            for opt in self.optimizers
        ]

        def name_of(tensor_path: tuple) -> Optional[str]:
            if tensor_path[0] == "state_dict":
                return tensor_path[1]
            if tensor_path[0] == "optimizer_states" and tensor_path[1] < len(slots):
                return slots[tensor_path[1]].get(tensor_path[3])
            return None

        return ShardLayout(
            self.mesh,
            bank_of=lambda path: banks.get(name_of(path) or ""),
            param_of=lambda path: params.get(name_of(path) or ""),
            expert_mesh=self._expert_mesh(),
        )

    def _expert_mesh(self) -> Any:
        """The (EP, EDP) mesh a strategy that shards the experts over their EDP ranks saves them on (None here)."""
        return None

    # Hooks of a strategy that holds weights in another form (trainer=fsdp: DTensor shards): what this rank holds,
    # made plain tensors (of its experts' rows) to save, and plain tensors made its own form to load.

    def _plain(self, values: dict[str, Any]) -> dict[str, Any]:
        return values

    def _placed(self, values: dict[Any, Any], params: dict[Any, Any]) -> dict[Any, Any]:
        """`values` (by key, the parameter of each key in `params`) in the form this rank holds them."""
        return values

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = self._plain(super().lightning_module_state_dict())
        if self.sharded_checkpoints:
            return state  # this rank's experts only: save_checkpoint writes them as slices of the whole
        for name, _, _ in self._expert_shards():  # a collective: every rank takes part
            assert self.groups is not None  # expert shards exist only under expert parallelism
            state[name] = all_gather(state[name].detach(), self.groups.ep_group).flatten(0, 1)
        return state

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        state = own_rows(self._moe_module(), dict(checkpoint["state_dict"]))
        state = self._placed(state, dict(self._moe_module().named_parameters()))
        super().load_model_state_dict({**checkpoint, "state_dict": state}, strict=strict)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """Adam's moments of expert shards, gathered to every expert."""
        state: dict[str, Any] = dict(super().optimizer_state(optimizer))
        state["state"] = {slot: self._plain(values) for slot, values in state["state"].items()}
        if self.groups is None or self.sharded_checkpoints:
            return state
        slots = self._optimizer_slots(optimizer)
        per_param = dict(state["state"])
        for _, param, experts in self._expert_shards():
            slot = slots.get(id(param))
            if slot in per_param:  # a new dict: optimizer.state_dict() shares its per-parameter dicts
                per_param[slot] = {
                    key: all_gather(value, self.groups.ep_group).flatten(0, 1)
                    if _per_expert(value, experts.num_experts)
                    else value
                    for key, value in per_param[slot].items()
                }
        return {**state, "state": per_param}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self.groups is not None:
            states = []
            for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
                slots = self._optimizer_slots(optimizer)
                per_param = dict(saved["state"])
                for _, param, experts in self._expert_shards():
                    slot = slots.get(id(param))
                    if slot in per_param:
                        per_param[slot] = {
                            key: _own_slice(value, experts) if _per_expert(value, experts.total_experts) else value
                            for key, value in per_param[slot].items()
                        }
                states.append({**saved, "state": per_param})
            checkpoint = {**checkpoint, "optimizer_states": states}
        by_id = {id(p): p for p in self._moe_module().parameters()}
        placed = []
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            params = {slot: by_id.get(p_id) for p_id, slot in self._optimizer_slots(optimizer).items()}
            placed.append({**saved, "state": self._placed(dict(saved["state"]), params)})
        checkpoint = {**checkpoint, "optimizer_states": placed}
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": self._own_kernels(checkpoint)})

    def _own_kernels(self, checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The saved optimizer states with this run's step kernels (fused, foreach) in each group: those are the
        layout's (trainer=fsdp steps one tensor at a time), not the checkpoint's."""
        out = []
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            current = getattr(optimizer, "_optimizer", optimizer).param_groups
            groups = [
                {**g, **{k: now[k] for k in ("fused", "foreach") if k in now}}
                for g, now in zip(saved["param_groups"], current)
            ]
            out.append({**saved, "param_groups": groups})
        return out

    @staticmethod
    def _optimizer_slots(optimizer) -> dict[int, int]:
        """id(parameter) -> its number in optimizer.state_dict(): parameters are numbered group by group."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {id(p): i for i, p in enumerate(params)}


def expert_shards(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, GroupedExperts]]:
    """(state-dict name, parameter, its expert bank) of every expert weight of `module` held as a slice."""
    for prefix, bank in module.named_modules():
        if isinstance(bank, GroupedExperts) and bank.is_sharded:
            for weight in bank.expert_weights:
                yield f"{prefix}.{weight}", getattr(bank, weight), bank


def own_rows(module: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`state` (a state dict of `module`, holding every expert) with each expert weight this rank holds a slice of
    cut to its rows: views, copied into the parameters by load_state_dict, so that of a memory-mapped checkpoint only
    the rank's rows are ever read."""
    for name, _, experts in expert_shards(module):
        state[name] = _own_slice(state[name], experts, copy=False)
    return state


def _per_expert(value: Any, num_experts: int) -> bool:
    return torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == num_experts


def _own_slice(tensor: torch.Tensor, experts: GroupedExperts, copy: bool = True) -> torch.Tensor:
    """This rank's experts of a tensor that holds every expert (a tensor already sliced is returned as it is).
    `copy=False` gives a view: for weights that load_state_dict copies into the parameters, so that of a
    memory-mapped checkpoint only the rank's rows are ever read."""
    if tensor.shape[0] != experts.total_experts:
        return tensor
    rows = tensor[experts.first_expert : experts.first_expert + experts.num_experts]
    return rows.clone() if copy else rows


def make_strategy(
    name: str,
    expert_parallel: int,
    checkpoint_format: str = "auto",
    async_save: bool = False,
    rendezvous_timeout_s: float = 600.0,
    run_dir: Optional[Path] = None,
    kind: type[MoEDDPStrategy] | None = None,
) -> MoEDDPStrategy:
    """moe-lab's strategy for `trainer.strategy: ddp` (or ddp_find_unused_parameters_true), or of another `kind`
    built on it (`fsdp`: fsdp.MoEFSDPStrategy). `checkpoint_format`: auto (sharded under expert parallelism or with
    `async_save`, one file otherwise), sharded or file."""
    return (kind or MoEDDPStrategy)(
        expert_parallel=expert_parallel,
        sharded_checkpoints=writes_sharded(checkpoint_format, expert_parallel, async_save),
        async_save=async_save,
        rendezvous_timeout_s=rendezvous_timeout_s,
        run_dir=run_dir,
        find_unused_parameters=name.endswith("true"),
    )


def writes_sharded(checkpoint_format: str, expert_parallel: int, async_save: bool) -> bool:
    """Whether a run writes sharded checkpoints (checkpoint.format=auto: under expert parallelism, or to save in the
    background, which DCP does)."""
    return checkpoint_format == "sharded" or (checkpoint_format == "auto" and (expert_parallel > 1 or async_save))
