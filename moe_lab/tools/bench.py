"""`moe-lab bench`: how fast the MoE layer and whole training steps are, against references.

For each case of a grid (tokens, d_model, experts, top_k, expert width, capacity factor or dropless) and each
implementation it times the MoE layer's forward (no grad) and forward + backward with warm-up, several repeats and the
median (synchronising the device), and records the activation memory saved for the backward pass (and the peak
allocated memory on a GPU). Implementations:
    grouped       moe-lab's layer: sort-based dispatch, torch._grouped_mm
    loop          moe-lab's per-expert reference (the test oracle)
    hf_eager, hf_grouped, torchtitan, olmo_core
                  the peers' MoE layers on the same weights (--compare; bench_peers.py), each checked to compute
                  moe-lab's output and input gradient before it is timed, or listed as not timed with the reason
    dense         a dense SwiGLU FFN with the MoE's active parameters: hidden = top_k x expert width (--compare)
It also times whole training steps (forward, backward, AdamW) of model presets, with tokens/s and, on GPUs in
moe-lab's peak table, MFU from 6 x active parameters + attention FLOPs per token; and with --compare, a whole
dropless model against the same weights exported to transformers. Ratios against the targets close the table.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import torch

from moe_lab.files import write_atomically
from moe_lab.tools import bench_baseline
from moe_lab.tools.bench_baseline import synchronize


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


# The cases the targets of the speed issue name, at one shape (4096 tokens, d_model 512): Mixtral-like 8 experts /
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


# The machine's own peak: a large plain GEMM (m x k times k x n), the shape at which a BLAS runs closest to the
# hardware. A GPU needs a larger one to fill its multiprocessors: an H200 ran 4096 x 512 x 4096 in bfloat16 at 300-350
# TFLOP/s (benchmarks/2026-12-04_h200), far from what 8192^3 reaches.
PEAK_SHAPE = {"cpu": (4096, 512, 4096), "cuda": (8192, 8192, 8192)}
PEAK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def gemm_flops(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], warmup: int, repeats: int
) -> float:
    """FLOP/s of one plain GEMM of `shape` (m, k, n) at `dtype`: 2 m k n over its median time."""
    m, k, n = shape
    torch.manual_seed(0)
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    return 2 * m * k * n / (median_ms(lambda: torch.mm(a, b), device, warmup, repeats) / 1e3)


def machine_peaks(
    device: torch.device, model_shape: tuple[int, int, int], warmup: int, repeats: int, quick: bool = False
) -> dict[str, dict[str, float]]:
    """{dtype: {"peak": FLOP/s of the large GEMM, "model": FLOP/s at the model's own FFN shape}}, measured here: on a
    CPU no vendor table gives a peak, and the measured one is what a fraction of peak (the MFU) is taken of."""
    shape = PEAK_SHAPE.get(device.type, PEAK_SHAPE["cpu"])
    large = tuple(d // 4 for d in shape) if quick else shape
    peaks = {}
    for name, dtype in PEAK_DTYPES.items():
        peaks[name] = {
            "peak": gemm_flops(device, dtype, large, warmup, repeats),
            "model": gemm_flops(device, dtype, model_shape, warmup, repeats),
            "peak_shape": list(large),
            "model_shape": list(model_shape),
        }
    return peaks


def with_fraction_of_peak(step: dict, peaks: dict[str, dict[str, float]], bf16_at_shape: float) -> dict:
    """A training step's achieved FLOP/s (tokens/s x the model's FLOPs per token) and its fraction of the measured
    GEMM peaks: of its own precision's largest GEMM, and of the bfloat16 GEMM at its own model's FFN shape
    (`bf16_at_shape`, FLOP/s)."""
    achieved = step["tokens_per_sec"] * step["flops_per_token"]
    own = "bfloat16" if step["precision"] == "bf16" else "float32"
    return {
        **step,
        "achieved_flops": achieved,
        "of_peak": achieved / peaks[own]["peak"],
        "bf16_gemm_at_shape": bf16_at_shape,
        "of_bf16_model_peak": achieved / bf16_at_shape,
    }


def with_fractions_of_peak(steps: list[dict], peaks: dict[str, dict[str, float]], device, warmup, repeats) -> list:
    """Every step against the peaks, each at its own model's GEMM shape (measured once per shape; the peaks' own
    model shape is already measured)."""
    at_shape = {tuple(peaks["bfloat16"]["model_shape"]): peaks["bfloat16"]["model"]}
    fp32_at_shape = {tuple(peaks["float32"]["model_shape"]): peaks["float32"]["model"]}
    for s in steps:
        shape = tuple(s["gemm_shape"])
        if shape not in at_shape:
            at_shape[shape] = gemm_flops(device, torch.bfloat16, shape, warmup, repeats)
        if shape not in fp32_at_shape:
            fp32_at_shape[shape] = gemm_flops(device, torch.float32, shape, warmup, repeats)
    return [
        {
            **with_fraction_of_peak(s, peaks, at_shape[tuple(s["gemm_shape"])]),
            "fp32_gemm_at_shape": fp32_at_shape[tuple(s["gemm_shape"])],
        }
        for s in steps
    ]


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


# ------------------------------------------------------------------------------------------------------------
# The implementations of one case


def moe_layer(case: Case, implementation: str, device: torch.device, dtype: torch.dtype):
    from moe_lab.model import MoEConfig, MoELayer
    from moe_lab.model.routers import TopKRouterConfig

    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=case.num_experts,
        expert_hidden=case.expert_hidden,
        capacity_factor=case.capacity_factor,
        eval_capacity_factor=case.capacity_factor,
        implementation=implementation,
        router=TopKRouterConfig(top_k=case.top_k, normalize=True),
    )
    return MoELayer(case.d_model, cfg).to(device=device, dtype=dtype)


def implementations(
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    compare: bool,
    with_loop: bool,
    x: torch.Tensor,
    grad: torch.Tensor,
    not_timed: list[dict],
):
    """name -> (module, forward(x) -> y, note): every implementation of a case, on the same weights. A peer is
    checked against moe-lab's layer on (x, grad) first; one that cannot run or computes something else goes to
    `not_timed` with the reason instead."""
    from moe_lab.model.experts import FeedForward
    from moe_lab.tools import bench_peers

    grouped = moe_layer(case, "grouped", device, dtype)
    reference = lambda t: grouped(t)[0]  # noqa: E731
    impls = {"grouped": (grouped, reference, "")}
    if with_loop:
        loop = moe_layer(case, "loop", device, dtype)
        loop.load_state_dict(grouped.state_dict())
        impls["loop"] = (loop, lambda t: loop(t)[0], "")
    if compare and case.capacity_factor is None:  # the peers' layers are dropless
        # In bfloat16, routing ties fall either way: compare the tokens whose routing is unambiguous.
        compared_T = None
        if dtype == torch.bfloat16:
            compared_T = bench_peers.unambiguous_tokens(grouped.router.gate_ED, x.view(-1, case.d_model), case.top_k)
        for name, build in bench_peers.PEERS.items():
            try:
                module = build(grouped, case, device, dtype)
                bf16 = name in bench_peers.COMPUTES_IN_BF16
                same = bench_peers.check_same_math(reference, module, x, grad, bf16, compared_T)
            except Exception as e:  # not installed, or cannot run on this device: the table says why
                reason = str(e) if isinstance(e, bench_peers.PeerUnavailable) else f"{type(e).__name__}: {e}"
                hint = bench_peers.KNOWN_LIMITS.get((name, device.type))
                not_timed.append(
                    {"case": case.name, "impl": name, "reason": reason.strip() + (f" ({hint})" if hint else "")}
                )
                continue
            if not same.ok:
                not_timed.append({"case": case.name, "impl": name, "reason": f"computes something else: {same}"})
                continue
            impls[name] = (module, module, str(same))
    if compare:
        torch.manual_seed(0)
        dense = FeedForward(case.d_model, case.dense_hidden).to(device=device, dtype=dtype)
        impls["dense"] = (dense, dense, "")
    return impls


def time_case(
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    compare: bool,
    with_loop: bool,
    warmup: int,
    repeats: int,
    not_timed: list[dict],
) -> list[Result]:
    results = []
    torch.manual_seed(1)
    x = torch.randn(1, case.tokens, case.d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    impls = implementations(case, device, dtype, compare, with_loop, x, grad, not_timed)
    for name, (module, forward, same_math) in impls.items():
        module.train()
        x_req = x.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                forward(x)

        def fwd_bwd():
            module.zero_grad(set_to_none=True)
            x_req.grad = None
            forward(x_req).backward(grad)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        forward_ms = median_ms(fwd, device, warmup, repeats)
        backward_ms = median_ms(fwd_bwd, device, warmup, repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        saved = saved_for_backward_mb(lambda: forward(x_req), module)
        results.append(
            Result(
                case.name,
                name,
                case.tokens,
                case.d_model,
                case.num_experts,
                case.top_k,
                case.expert_hidden,
                case.capacity_factor,
                forward_ms,
                backward_ms,
                saved,
                peak,
                {"same_math": same_math} if same_math else {},
            )
        )
    return results


# ------------------------------------------------------------------------------------------------------------
# Whole training steps


def compose_run(preset: str, overrides: list[str]):
    """The validated TrainConfig `moe-lab train model=PRESET OVERRIDES` runs, composed from conf/ (vocabulary of 320
    tokens, the embedded corpus's)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from moe_lab.training.schemas import config_dir, validate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={preset}"] + overrides + ["paths.output_dir=."])
    GlobalHydra.instance().clear()
    run = validate(cfg)
    run.model.vocab_size = 320
    return run


def compose_model(preset: str, overrides: list[str]):
    """The model config of a preset, composed from conf/ as `moe-lab train` does (vocabulary of 320 tokens)."""
    return compose_run(preset, overrides).model


# The learning rate of timed training steps: the default run's, so that routing moves from step to step as it does in
# training (on a CPU, a bfloat16 GEMM of a shape not seen before pays for a new kernel; a frozen routing hides that).
STEP_LR = 3e-3


def moe_lab_step(
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer,
    autocast: Optional[contextlib.AbstractContextManager] = None,
) -> Callable[[], None]:
    """One training step of a moe-lab model as `moe-lab train` takes it: loss plus the weighted aux losses,
    backward, optimizer step; under `autocast` if given."""
    autocast = autocast if autocast is not None else contextlib.nullcontext()

    def step():
        with autocast:
            out = model(inputs, targets)
            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_training_step(
    preset: str,
    experts: Optional[str],
    batch_size: int,
    seq_len: int,
    device: torch.device,
    precision: str,
    warmup: int,
    repeats: int,
) -> dict:
    """Tokens/s of forward + backward + AdamW for a model preset (config composed from conf/ as `moe-lab train`)."""
    from moe_lab.model import MoETransformer
    from moe_lab.training.metrics import peak_flops

    model_cfg = compose_model(preset, [f"experts={experts}"] if experts else [])
    torch.manual_seed(0)
    model = MoETransformer(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=STEP_LR, fused=device.type == "cuda")
    ids = torch.randint(0, 256, (batch_size, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    ms = median_ms(moe_lab_step(model, ids[:, :-1], ids[:, 1:], optimizer, autocast), device, warmup, repeats)
    tokens_per_sec = batch_size * seq_len / (ms / 1e3)
    flops = model.flops_per_token(seq_len)
    peak = peak_flops(device, "bf16-mixed" if precision == "bf16" else "32-true")
    params = model.num_params()
    return {
        "preset": preset + (f" experts={experts}" if experts else ""),
        "batch": batch_size,
        "seq_len": seq_len,
        "precision": precision,
        "step_ms": ms,
        "tokens_per_sec": tokens_per_sec,
        "params_total": params["total"],
        "params_active": params["active"],
        "flops_per_token": flops,
        "mfu": tokens_per_sec * flops / peak if peak else None,
        # The FFN GEMM at this model's own shape (tokens of a step, d_model, ffn_hidden), set against its FLOP/s.
        "gemm_shape": [batch_size * seq_len, model_cfg.d_model, model_cfg.ffn_hidden],
    }


def hf_step(
    hf,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer,
    autocast: Optional[contextlib.AbstractContextManager] = None,
) -> Callable[[], None]:
    """One training step of a transformers MoE: cross-entropy plus its own load-balancing loss, backward, AdamW."""
    import torch.nn.functional as F

    autocast = autocast if autocast is not None else contextlib.nullcontext()

    def step():
        with autocast:
            out = hf(input_ids=inputs)
            logits = out.logits.float().flatten(0, 1)
            loss = F.cross_entropy(logits, targets.flatten()) + out.aux_loss * hf.config.router_aux_loss_coef
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def exported_pair(preset: str, experts: Optional[str], device: torch.device):
    """(a dropless moe-lab model, its transformers export, the relative L2 error of their float32 logits)."""
    from moe_lab.interop.huggingface import to_hf
    from moe_lab.model import MoETransformer

    overrides = ([f"experts={experts}"] if experts else []) + [
        "model.moe.capacity_factor=null",
        "model.moe.eval_capacity_factor=null",
    ]
    torch.manual_seed(0)
    model = MoETransformer(compose_model(preset, overrides)).to(device)
    hf = to_hf(model, eos_id=0).to(device)
    hf.config.output_router_logits = True
    inputs = torch.randint(0, 256, (2, 64), device=device)
    with torch.no_grad():
        model.eval()
        ours = model(inputs).logits
        theirs = hf(input_ids=inputs).logits
    model.train()
    hf.train()
    return model, hf, ((ours - theirs).norm() / ours.norm()).item()


def whole_model_steps(model, hf, ids: torch.Tensor, device: torch.device, dtype: torch.dtype, compiled: bool):
    """{name: training step} of moe-lab's model and transformers', and with `compiled` a compiled copy of each (so
    that each is also compared at its fastest: both through torch.compile); each with its own AdamW at STEP_LR,
    under bf16 autocast when `dtype` is bfloat16."""
    import copy

    inputs, targets = ids[:, :-1], ids[:, 1:]
    models = {"moe-lab": model, "transformers": hf}
    if compiled:
        models["moe-lab compiled"] = copy.deepcopy(model)
        models["transformers compiled"] = copy.deepcopy(hf)
    steps = {}
    for name, module in models.items():
        optimizer = torch.optim.AdamW(module.parameters(), lr=STEP_LR, fused=device.type == "cuda")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        forward = torch.compile(module) if name.endswith("compiled") else module
        if name.startswith("transformers"):
            forward.config = module.config  # hf_step reads the aux-loss weight from it
            steps[name] = hf_step(forward, inputs, targets, optimizer, autocast)
        else:
            steps[name] = moe_lab_step(forward, inputs, targets, optimizer, autocast)
    return steps


def time_whole_model_vs_hf(
    preset: str,
    experts: Optional[str],
    batch_size: int,
    seq_len: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    dtype: torch.dtype = torch.float32,
    compiled: bool = False,
) -> dict:
    """A training step (forward, backward with the load-balancing loss, AdamW) of a dropless moe-lab model and of
    the same model exported to transformers (`to_hf`, the weights of `moe-lab export --format hf`, its default
    experts), both in float32 or both under bf16 autocast (float32 weights), timed in interleaved rounds; with
    `compiled`, moe-lab's step through torch.compile as well (its CPU default in bf16-mixed).

    Both compute the same logits (checked first in float32: relative L2 error, bar 1e-4); each adds its own
    load-balancing loss at the same weight (transformers' `load_balancing_loss_func` with output_router_logits;
    moe-lab's Switch loss and z-loss as configured)."""
    model, hf, error = exported_pair(preset, experts, device)
    if error > 1e-4:
        return {"preset": preset, "not_timed": f"the exported model computes other logits (relative error {error:.1e})"}
    ids = torch.randint(0, 256, (batch_size, seq_len + 1), device=device)
    steps = whole_model_steps(model, hf, ids, device, dtype, compiled)
    times = bench_baseline.interleaved_seconds(steps, device, warmup, repeats)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    out = {
        "preset": preset + (f" experts={experts}" if experts else "") + " dropless",
        "architecture": type(hf).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch_size,
        "seq_len": seq_len,
        "rounds": len(times["moe-lab"]),
        "logits_error": error,
        "moe_lab_ms": ms["moe-lab"],
        "transformers_ms": ms["transformers"],
        **bench_baseline.round_ratios(times["transformers"], times["moe-lab"]),
    }
    if compiled:
        out["moe_lab_compiled_ms"] = ms["moe-lab compiled"]
        out["transformers_compiled_ms"] = ms["transformers compiled"]
        out.update(bench_baseline.round_ratios(times["transformers"], times["moe-lab compiled"], "compiled_speedup"))
        out.update(
            bench_baseline.round_ratios(times["transformers compiled"], times["moe-lab compiled"], "both_compiled")
        )
    return out


# ------------------------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


PEER_NAMES = ("hf_eager", "hf_grouped", "torchtitan", "olmo_core")
# Forward + backward speed-up over the fastest peer that ran, per case (the speed issue's bars).
PEER_SPEEDUP_TARGETS = {"E8-top2": 1.3, "E64-top8": 1.5, "E128-top8": 1.5}
# moe-lab's time over a dense SwiGLU of equal active parameters (the first speed issue's bars).
DENSE_TIME_TARGETS = {"E8-top2": 1.25, "E64-top8": 1.5}
DENSE_MEMORY_TARGET = 1.6  # activation memory of the MoE layer over the dense FFN of equal active parameters
WHOLE_MODEL_TARGET = 1.3  # whole-model training step, speed-up over transformers on the same weights
TRAINING_STEP_TARGET = 0.9  # tokens/s of the default MoE over the dense model of equal active parameters
PEAK_FRACTION_TARGET = 0.5  # the default training step's FLOP/s over the machine's bf16 GEMM at the model's shape


class Ratios(list):
    """(case, comparison, ratio, target, met) rows (met None: no target)."""

    def add(self, case: str, what: str, value: float, bar: float, higher_is_better: bool) -> None:
        met = value >= bar if higher_is_better else value <= bar
        self.append((case, what, value, (">= " if higher_is_better else "<= ") + f"{bar}x", met))

    def note(self, case: str, what: str, value: float) -> None:
        self.append((case, what, value, "(no target)", None))


def ratios(
    results: list[Result], steps: list[dict] = (), whole_models: list[dict] = (), dtype: str = "float32"
) -> list[tuple[str, str, float, str, Optional[bool]]]:
    """(case, comparison, ratio, target, met) for the targets of the speed issues (met None: no target)."""
    by = {(r.case, r.impl): r for r in results}
    out = Ratios()
    for case in dict.fromkeys(r.case for r in results):
        ours = by.get((case, "grouped"))
        if ours is None or case.startswith("scale-"):
            continue
        peer_ratios(out, case, ours, [by[(case, p)] for p in PEER_NAMES if (case, p) in by], dtype)
        dense = by.get((case, "dense"))
        if dense is not None:
            if case in DENSE_TIME_TARGETS:
                out.add(
                    case,
                    "time / dense SwiGLU of equal active params",
                    ours.forward_backward_ms / dense.forward_backward_ms,
                    DENSE_TIME_TARGETS[case],
                    False,
                )
            out.add(
                case, "activation memory / dense SwiGLU", ours.saved_mb / dense.saved_mb, DENSE_MEMORY_TARGET, False
            )
    scaling_ratios(out, results)
    model_ratios(out, steps, whole_models)
    return list(out)


def peer_ratios(out: Ratios, case: str, ours: Result, peers: list[Result], dtype: str) -> None:
    """moe-lab's layer against the peers' on one case: speed and activation memory."""
    from moe_lab.tools.bench_peers import COMPUTES_IN_BF16

    # A peer that runs its GEMMs in bfloat16 in a float32 bench does cheaper math: it is shown, but the target
    # is against the fastest peer computing at moe-lab's precision.
    lower = [r for r in peers if r.impl in COMPUTES_IN_BF16 and dtype == "float32"]
    same = [r for r in peers if r not in lower]
    if same and case in PEER_SPEEDUP_TARGETS:
        best = min(same, key=lambda r: r.forward_backward_ms)
        out.add(
            case,
            f"speed-up over the fastest peer ({best.impl})",
            best.forward_backward_ms / ours.forward_backward_ms,
            PEER_SPEEDUP_TARGETS[case],
            True,
        )
    for r in lower:
        speedup = r.forward_backward_ms / ours.forward_backward_ms
        out.note(case, f"speed-up over {r.impl} (its expert GEMMs in bf16)", speedup)
    if peers:
        least = min(peers, key=lambda r: r.saved_mb)
        out.add(
            case, f"activation memory / the least peer's ({least.impl})", ours.saved_mb / least.saved_mb, 1.0, False
        )


def scaling_ratios(out: Ratios, results: list[Result]) -> None:
    """Time from the fewest to the most experts of each scaling family (the same active compute)."""
    families: dict[str, list[Result]] = {}
    for r in results:
        if r.case.startswith("scale-") and r.impl == "grouped":
            families.setdefault(r.case.rsplit("-E", 1)[0], []).append(r)
    for family, rows in families.items():
        rows.sort(key=lambda r: r.num_experts)
        if len(rows) >= 2:
            out.add(
                f"{family}: E{rows[0].num_experts} -> E{rows[-1].num_experts}",
                f"time ratio ({rows[0].tokens} tokens, top-{rows[0].top_k}, width {rows[0].expert_hidden})",
                rows[-1].forward_backward_ms / rows[0].forward_backward_ms,
                1.2,
                False,
            )


def model_ratios(out: Ratios, steps: list[dict], whole_models: list[dict]) -> None:
    """Whole models against transformers, and the MoE training step against its dense twin."""
    for w in whole_models:
        if "speedup" in w:
            what = f"whole-model step, speed-up over transformers ({w['architecture']}, {w['dtype']})"
            out.add(w["preset"], what, w["speedup"], WHOLE_MODEL_TARGET, True)
            if "both_compiled" in w:
                what = f"whole-model step, both compiled ({w['dtype']})"
                out.add(w["preset"], what, w["both_compiled"], WHOLE_MODEL_TARGET, True)
            if "compiled_speedup" in w:
                what = f"whole-model step compiled, over transformers eager ({w['dtype']})"
                out.note(w["preset"], what, w["compiled_speedup"])
    moe = next((s for s in steps if s["preset"] == "tiny"), None)
    dense = next((s for s in steps if s["preset"] == "dense_tiny"), None)
    if moe and "of_bf16_model_peak" in moe:
        what = "training step FLOP/s / the bf16 GEMM's at the model's shape"
        if moe.get("bf16_gemm_at_shape", 0) < moe.get("fp32_gemm_at_shape", 0):
            out.note("tiny", what + " (bf16 emulated here: no bar)", moe["of_bf16_model_peak"])
        else:
            out.add("tiny", what, moe["of_bf16_model_peak"], PEAK_FRACTION_TARGET, True)
    if moe and dense:
        ratio = moe["tokens_per_sec"] / dense["tokens_per_sec"]
        out.add(
            "tiny vs dense_tiny",
            "training step tokens/s, MoE / dense of equal active",
            ratio,
            TRAINING_STEP_TARGET,
            True,
        )


def print_table(
    results: list[Result],
    steps: list[dict],
    checks: list[tuple],
    not_timed: list[dict] = (),
    whole_models: list[dict] = (),
) -> None:
    print(f"\n{'case':<22} {'impl':<11} {'fwd ms':>9} {'fwd+bwd ms':>11} {'saved MB':>9} {'peak MB':>9}  same math")
    for r in results:
        peak = f"{r.peak_mb:9.0f}" if r.peak_mb is not None else f"{'-':>9}"
        print(
            f"{r.case:<22} {r.impl:<11} {r.forward_ms:9.2f} {r.forward_backward_ms:11.2f} {r.saved_mb:9.1f} {peak}"
            f"  {r.extra.get('same_math', '')}"
        )
    for n in not_timed:
        print(f"{n['case']:<22} {n['impl']:<11} not timed: {n['reason']}")
    if steps:
        print(
            f"\n{'training step':<28} {'batch x seq':>12} {'ms':>9} {'tokens/s':>10} {'active params':>14} {'MFU':>6} "
            f"{'GFLOP/s':>8} {'of peak':>8} {'of bf16 GEMM at its shape':>26}"
        )
        for s in steps:
            mfu = f"{100 * s['mfu']:5.1f}%" if s["mfu"] is not None else f"{'-':>6}"
            measured = (
                f" {s['achieved_flops'] / 1e9:8.1f} {100 * s['of_peak']:7.1f}% {100 * s['of_bf16_model_peak']:25.1f}%"
                if "achieved_flops" in s
                else ""
            )
            print(
                f"{s['preset']:<28} {s['batch']:>5} x {s['seq_len']:<4} {s['step_ms']:9.1f} "
                f"{s['tokens_per_sec']:10.0f} {s['params_active'] / 1e6:13.2f}M {mfu}{measured}"
            )
    if whole_models:
        print(f"\n{'whole model (train step)':<34} {'moe-lab ms':>11} {'transformers ms':>16}  logits error")
        for w in whole_models:
            if "not_timed" in w:
                print(f"{w['preset']:<34} not timed: {w['not_timed']}")
            else:
                compiled = (
                    f"; compiled {w['moe_lab_compiled_ms']:.1f} against {w['transformers_compiled_ms']:.1f} ms, "
                    f"per round {w['both_compiled_low']:.2f}-{w['both_compiled_high']:.2f}x"
                    if "moe_lab_compiled_ms" in w
                    else ""
                )
                print(
                    f"{w['preset']:<34} {w['moe_lab_ms']:11.1f} {w['transformers_ms']:16.1f}  "
                    f"{w['logits_error']:.1e} ({w['architecture']}, {w['dtype']}, {w['batch']} x {w['seq_len']}, "
                    f"per round {w['speedup_low']:.2f}-{w['speedup_high']:.2f}x{compiled})"
                )
    if checks:
        print(f"\n{'case':<26} {'ratio':<58} {'measured':>9}  target")
        for case, what, value, target, met in checks:
            verdict = "" if met is None else "met" if met else "NOT MET"
            print(f"{case:<26} {what:<58} {value:8.2f}x  {target:<8} {verdict}")


def step_presets(args, device: torch.device) -> tuple[list[tuple[str, Optional[str]]], int, int]:
    """The (preset, experts) whose training steps are timed, and their batch and sequence length: tiny and its dense
    twin on a CPU, the small and base presets (and base's dense twin) on a GPU."""
    if args.quick:
        return [("tiny", None), ("dense_tiny", None)], 2, 64
    if device.type == "cpu":
        return [("tiny", None), ("dense_tiny", None)], 8, 256
    return [("small", None), ("base", None), ("base", "dense")], 16, 1024


def step_gemm_shape(args, device: torch.device) -> tuple[int, int, int]:
    """(tokens, d_model, ffn_hidden) of the first timed preset's training step: the FFN GEMM at the model's shape."""
    presets, batch, seq = step_presets(args, device)
    model = compose_model(presets[0][0], [])
    return batch * seq, model.d_model, model.ffn_hidden


def print_peaks(peaks: dict[str, dict[str, float]]) -> None:
    print(f"\n{'plain GEMM (the machine)':<28} {'dtype':<9} {'shape m x k x n':>20} {'GFLOP/s':>9}")
    for dtype, p in peaks.items():
        for key in ("peak", "model"):
            shape = " x ".join(map(str, p[f"{key}_shape"]))
            print(
                f"{'largest' if key == 'peak' else 'at the model shape':<28} {dtype:<9} {shape:>20} {p[key] / 1e9:9.1f}"
            )


def time_training_steps(args, device: torch.device) -> list[dict]:
    """Whole training steps of the model presets (step_presets)."""
    presets, batch, seq = step_presets(args, device)
    return [
        time_training_step(
            preset,
            experts,
            batch,
            seq,
            device,
            "bf16" if device.type == "cuda" or args.dtype == "bfloat16" else "fp32",
            args.warmup,
            args.repeats,
        )
        for preset, experts in presets
    ]


def time_whole_models(args, device: torch.device) -> list[dict]:
    """Whole models against their transformers export (--compare)."""
    shapes = [("tiny", "e8"), ("tiny", "e64_fine")] if device.type == "cpu" else [("small", None)]
    batch, seq = (8, 256) if device.type == "cpu" else (16, 1024)
    if args.quick:
        shapes, batch, seq = [("tiny", None)], 2, 64
    from moe_lab.training.schemas import can_build_cpu_kernels

    dtype = PEAK_DTYPES[args.dtype]
    # In bfloat16 on a CPU, moe-lab's step as its default runs it (compiled) too.
    compiled = dtype == torch.bfloat16 and device.type == "cpu" and can_build_cpu_kernels() and not args.quick
    whole_models = []
    for preset, experts in shapes:
        try:
            whole_models.append(
                time_whole_model_vs_hf(
                    preset, experts, batch, seq, device, args.warmup, args.repeats, dtype, compiled=compiled
                )
            )
        except ImportError as e:
            whole_models.append({"preset": preset, "not_timed": f"transformers is not installed ({e})"})
    return whole_models


def measure_baseline(args, device: torch.device) -> dict:
    """`moe-lab bench --baseline`: the machine's GEMM peaks, then the default training step against float32 eager,
    interleaved (bench_baseline.py)."""
    started = time.time()
    run = compose_run("tiny", [f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"])
    peaks = machine_peaks(
        device, (run.data.batch_size * run.data.seq_len, run.model.d_model, run.model.ffn_hidden), 3, 10
    )
    baseline = bench_baseline.compare(run, device, args.warmup, args.repeats, peaks)
    print_peaks(peaks)
    bench_baseline.print_report(baseline)
    report = {
        "machine": machine(),
        "gemm_peaks": peaks,
        "device": str(device),
        "seconds": round(time.time() - started, 1),
        "command": "moe-lab bench " + " ".join(args.argv),
        "baseline": baseline,
    }
    out = write_report(report, [], args.out)
    print(f"\nmoe-lab bench: {time.time() - started:.0f}s on {device} ({torch.get_num_threads()} threads); wrote {out}")
    return report


def write_report(report: dict, results: list[Result], out_dir: Optional[str]) -> Path:
    """bench.json (everything) and bench.csv (the layer timings) in `out_dir` (default benchmarks/results/NOW)."""
    out = Path(out_dir or f"benchmarks/results/{datetime.now():%Y-%m-%d_%H-%M-%S}").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "bench.json", json.dumps(report, indent=2) + "\n")
    if not results:
        return out
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[k for k in asdict(results[0]) if k != "extra"])
    writer.writeheader()
    for r in results:
        row = asdict(r)
        row.pop("extra")
        writer.writerow(row)
    write_atomically(out / "bench.csv", table.getvalue())
    return out


def run(args) -> int:
    """`moe-lab bench` with its parsed arguments (moe_lab/cli/commands.py)."""
    measure(args)
    return 0


def measure(args) -> dict:
    """Every timing the arguments ask for, printed and written to bench.json and bench.csv; returns the report."""
    from moe_lab.training.runtime import retain_freed_memory

    retain_freed_memory()  # as `moe-lab train` does
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    cases = list(COMPARE_CASES) + list(SCALING_CASES) + (list(CAPACITY_CASES) if args.capacity else [])
    if args.quick:
        cases = [
            Case(c.name, 512, 128, c.num_experts, c.top_k, c.expert_hidden // 4, c.capacity_factor) for c in cases[:3]
        ]
    if args.baseline:
        return measure_baseline(args, device)
    started = time.time()
    results: list[Result] = []
    not_timed: list[dict] = []
    for case in cases:
        with_loop = args.loop and case.num_experts <= 64 and case.tokens <= 4096
        results.extend(
            time_case(
                case,
                device,
                dtype,
                args.compare and not case.name.startswith("scale"),
                with_loop,
                args.warmup,
                args.repeats,
                not_timed,
            )
        )
        print(f"moe-lab bench: {case.name} done ({time.time() - started:.0f}s)", flush=True)
    steps = [] if args.no_steps else time_training_steps(args, device)
    peaks = machine_peaks(device, step_gemm_shape(args, device), args.warmup, args.repeats, args.quick)
    steps = with_fractions_of_peak(steps, peaks, device, args.warmup, args.repeats)
    whole_models = time_whole_models(args, device) if args.compare and not args.no_steps else []
    checks = ratios(results, steps, whole_models, args.dtype)
    if args.quick:  # tiny shapes, few repeats: the ratios are shown, no bar is judged on them
        checks = [(case, what, value, "(--quick)", None) for case, what, value, _, _ in checks]
    print_table(results, steps, checks, not_timed, whole_models)
    print_peaks(peaks)
    report = {
        "machine": machine(),
        "gemm_peaks": peaks,
        "device": str(device),
        "dtype": args.dtype,
        "seconds": round(time.time() - started, 1),
        "command": "moe-lab bench " + " ".join(args.argv),
        "cases": [asdict(r) for r in results],
        "training_steps": steps,
        "whole_models": whole_models,
        "not_timed": not_timed,
        "ratios": [dict(zip(("case", "comparison", "ratio", "target", "met"), c)) for c in checks],
    }
    out = write_report(report, results, args.out)
    print(
        f"\nmoe-lab bench: {len(results)} timings in {report['seconds']:.0f}s on {device} "
        f"({torch.get_num_threads()} threads); wrote {out}/bench.json and bench.csv"
    )
    if args.quick:
        print(
            "moe-lab bench: --quick is a smoke test (tiny shapes, a few milliseconds each, where the first calls' "
            "costs and the machine's noise can outweigh the work): its times are not measurements and no target "
            "is judged; time without --quick"
        )
    return report
