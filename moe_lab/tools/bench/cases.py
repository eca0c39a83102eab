"""The cases `moe-lab bench` times and its measuring tools: the median of timed calls, and the activation memory a
forward pass keeps for backward."""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_lab.tools.bench.baseline import synchronize


@dataclass
class Case:
    name: str
    tokens: int
    d_model: int
    num_experts: int
    top_k: int
    expert_hidden: int
    capacity_factor: Optional[float] = None  # None = dropless

    @property
    def dense_hidden(self) -> int:
        return self.top_k * self.expert_hidden


# The cases moe-lab's bars are set on (report.py), at one shape (4096 tokens, d_model 512): Mixtral-like 8 experts /
# top-2 of width 1024, and fine-grained 64 and 128 experts / top-8 of width 256 (the same active width, 2048).
COMPARE_CASES = [
    Case("E8-top2", 4096, 512, 8, 2, 1024),
    Case("E64-top8", 4096, 512, 64, 8, 256),
    Case("E128-top8", 4096, 512, 128, 8, 256),
]
# Expert-count scaling, 8 -> 256 experts with top_k and expert width fixed, in three regimes: top-2 of width 512 and
# fine-grained top-8 of width 256 at 4096 tokens, and the fine-grained one at 16384 tokens per step.
SCALING_CASES = [
    Case(f"scale-{family}-E{e}", tokens, 512, e, k, width)
    for family, tokens, k, width in (("k2w512", 4096, 2, 512), ("k8w256", 4096, 8, 256), ("k8w256t16k", 16384, 8, 256))
    for e in (8, 256)
]
CAPACITY_CASES = [
    Case("E8-top2-cf1.25", 4096, 512, 8, 2, 1024, 1.25),
    Case("E64-top8-cf1.25", 4096, 512, 64, 8, 256, 1.25),
]


# The shape VeOmni (issue #460) reports 242 TFLOP/s at on an H100: 128 experts top-8 of width 768, d_model 2048,
# 32768 tokens. 7.4 TFLOP per forward + backward: a GPU case (`moe-lab bench` on CUDA; minutes on a CPU).
VEOMNI_CASE = Case("E128-top8-S32768-H2048", 32768, 2048, 128, 8, 768)


def expert_gemm_flops(case: Case) -> int:
    """FLOPs of a case's expert GEMMs in forward + backward: three GEMMs of d_model x width per routed token and
    expert forward (gate, up, down), twice that backward (the router's GEMM, 1% of them, left out)."""
    return 3 * 2 * case.tokens * case.top_k * 3 * case.d_model * case.expert_hidden


@dataclass
class Result:
    case: str
    impl: str
    tokens: int
    d_model: int
    num_experts: int
    top_k: int
    expert_hidden: int
    capacity_factor: Optional[float]
    forward_ms: float
    forward_backward_ms: float
    saved_mb: float
    peak_mb: Optional[float] = None
    extra: dict = field(default_factory=dict)


def median_ms(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int, budget_s: float = 20.0) -> float:
    """Median wall time of fn() in ms, after warm-up; slow functions get fewer repeats (at least 3) within budget_s."""
    for i in range(max(warmup, 1)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        first = time.perf_counter() - start
        if first * warmup > budget_s / 2 and i >= 0:
            break  # one warm-up is enough for something this slow
    repeats = max(3, min(repeats, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def saved_for_backward_mb(fn: Callable[[], torch.Tensor], module: Optional[torch.nn.Module] = None) -> float:
    """MB of the tensors autograd keeps for the backward pass of fn(): the activation memory. A tensor sharing its
    storage with one of `module`'s parameters is not counted (a GEMM keeps its weight operand, a view of the
    parameter: that memory is the model's, whatever the layer keeps)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
    total = 0
    seen = set()

    def pack(t: torch.Tensor):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and key[0] not in params:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total / 2**20


# Operations that launch no kernel on a GPU: allocations without a fill (views are told by their schema).
ALLOCATIONS = frozenset({"empty", "empty_like", "new_empty", "empty_strided"})
# Operations after which the host waits for the device: a scalar read (.item(), bool(t)), or an output whose size
# depends on the data.
HOST_READS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}
)


@dataclass
class OpCount:
    """The aten operations of one call: `total` as torch dispatches them, `kernels` those that launch a kernel on a
    GPU (views and unfilled allocations excluded), `host_reads` those a GPU would synchronise on."""

    total: int
    kernels: int
    host_reads: int
    by_op: dict[str, int]


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[Any] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> OpCount:
    """Count the aten operations of fn() (forward and backward alike: autograd dispatches through the same mode)."""
    with _CountOps() as counter:
        fn()
    names = collections.Counter()
    kernels = host_reads = 0
    for func, n in counter.ops.items():
        name = func.overloadpacket.__name__
        names[name] += n
        kernels += n if not (func.is_view or name in ALLOCATIONS) else 0
        host_reads += n if name in HOST_READS else 0
    return OpCount(sum(counter.ops.values()), kernels, host_reads, dict(names))
