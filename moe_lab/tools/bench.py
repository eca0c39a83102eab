"""`moe-lab bench`: how fast the MoE layer and whole training steps are, against references.

For each case of a grid (tokens, d_model, experts, top_k, expert width, capacity factor or dropless) and each
implementation it times the MoE layer's forward (no grad) and forward + backward with warm-up, several repeats and the
median (synchronising the device), and records the activation memory saved for the backward pass (and the peak
allocated memory on a GPU). Implementations:
    grouped       moe-lab's layer: sort-based dispatch, torch._grouped_mm
    loop          moe-lab's per-expert reference (the test oracle)
    hf_eager      transformers' MixtralSparseMoeBlock with eager experts, on the same weights (--compare)
    hf_grouped    the same block with transformers' grouped_mm experts (--compare)
    dense         a dense SwiGLU FFN with the MoE's active parameters: hidden = top_k x expert width (--compare)
It also times whole training steps (forward, backward, AdamW) of model presets, with tokens/s and, on GPUs in
moe-lab's peak table, MFU from 6 x active parameters + attention FLOPs per token.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import torch


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
SCALING_CASES = [Case(f"scale-{family}-E{e}", tokens, 512, e, k, width)
                 for family, tokens, k, width in (("k2w512", 4096, 2, 512), ("k8w256", 4096, 8, 256),
                                                  ("k8w256t16k", 16384, 8, 256))
                 for e in (8, 256)]
CAPACITY_CASES = [Case("E8-top2-cf1.25", 4096, 512, 8, 2, 1024, 1.25), Case("E64-top8-cf1.25", 4096, 512, 64, 8, 256, 1.25)]


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int,
              budget_s: float = 20.0) -> float:
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


def saved_for_backward_mb(fn: Callable[[], torch.Tensor]) -> float:
    """Bytes of the tensors autograd keeps for the backward pass of fn() (the activation memory), in MB."""
    total = 0
    seen = set()

    def pack(t: torch.Tensor):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
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
    cfg = MoEConfig(num_experts=case.num_experts, expert_hidden=case.expert_hidden,
                    capacity_factor=case.capacity_factor, eval_capacity_factor=case.capacity_factor,
                    implementation=implementation, router=TopKRouterConfig(top_k=case.top_k, normalize=True))
    return MoELayer(case.d_model, cfg).to(device=device, dtype=dtype)


def hf_block(layer, case: Case, experts_implementation: str, device: torch.device, dtype: torch.dtype):
    """transformers' Mixtral block (softmax top-k, renormalised: the same routing) holding `layer`'s weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=case.d_model, intermediate_size=case.expert_hidden,
                           num_local_experts=case.num_experts, num_experts_per_tok=case.top_k, router_jitter_noise=0.0)
    config._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate_ED)
        block.experts.gate_up_proj.copy_(layer.experts.w_in_EGFD)
        block.experts.down_proj.copy_(layer.experts.w_out_EDF)
    return block


def implementations(case: Case, device: torch.device, dtype: torch.dtype, compare: bool, with_loop: bool):
    """name -> (module, forward(x) -> y): every implementation of a case, on the same weights."""
    from moe_lab.model.experts import FeedForward

    grouped = moe_layer(case, "grouped", device, dtype)
    impls = {"grouped": (grouped, lambda x: grouped(x)[0])}
    if with_loop:
        loop = moe_layer(case, "loop", device, dtype)
        loop.load_state_dict(grouped.state_dict())
        impls["loop"] = (loop, lambda x: loop(x)[0])
    if compare and case.capacity_factor is None:  # Hugging Face blocks are dropless
        for name, kind in (("hf_eager", "eager"), ("hf_grouped", "grouped_mm")):
            try:
                block = hf_block(grouped, case, kind, device, dtype)
            except Exception as e:  # transformers missing or too old: say so in the table
                print(f"moe-lab bench: {name} unavailable ({type(e).__name__}: {e})")
                continue
            impls[name] = (block, block)
    if compare:
        torch.manual_seed(0)
        dense = FeedForward(case.d_model, case.dense_hidden).to(device=device, dtype=dtype)
        impls["dense"] = (dense, dense)
    return impls


def time_case(case: Case, device: torch.device, dtype: torch.dtype, compare: bool, with_loop: bool, warmup: int,
              repeats: int) -> list[Result]:
    results = []
    torch.manual_seed(1)
    x = torch.randn(1, case.tokens, case.d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    for name, (module, forward) in implementations(case, device, dtype, compare, with_loop).items():
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
        saved = saved_for_backward_mb(lambda: forward(x_req))
        results.append(Result(case.name, name, case.tokens, case.d_model, case.num_experts, case.top_k,
                              case.expert_hidden, case.capacity_factor, forward_ms, backward_ms, saved, peak))
    return results


# ------------------------------------------------------------------------------------------------------------
# Whole training steps


def time_training_step(preset: str, experts: Optional[str], batch_size: int, seq_len: int, device: torch.device,
                       precision: str, warmup: int, repeats: int) -> dict:
    """Tokens/s of forward + backward + AdamW for a model preset (config composed from conf/ as `moe-lab train`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from moe_lab.model import MoETransformer
    from moe_lab.training.metrics import peak_flops
    from moe_lab.training.schemas import config_dir, validate

    overrides = [f"model={preset}"] + ([f"experts={experts}"] if experts else [])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides + ["paths.output_dir=."])
    GlobalHydra.instance().clear()
    model_cfg = validate(cfg).model
    model_cfg.vocab_size = 320
    torch.manual_seed(0)
    model = MoETransformer(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, 256, (batch_size, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            out = model(ids[:, :-1], ids[:, 1:])
            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = median_ms(step, device, warmup, repeats)
    tokens_per_sec = batch_size * seq_len / (ms / 1e3)
    flops = model.flops_per_token(seq_len)
    peak = peak_flops(device, "bf16-mixed" if precision == "bf16" else "32-true")
    params = model.num_params()
    return {"preset": preset + (f" experts={experts}" if experts else ""), "batch": batch_size, "seq_len": seq_len,
            "precision": precision, "step_ms": ms, "tokens_per_sec": tokens_per_sec,
            "params_total": params["total"], "params_active": params["active"], "flops_per_token": flops,
            "mfu": tokens_per_sec * flops / peak if peak else None}


# ------------------------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ratios(results: list[Result]) -> list[tuple[str, str, float, str]]:
    """(case, comparison, ratio, target) for the targets of the speed issue (forward + backward)."""
    by = {(r.case, r.impl): r.forward_backward_ms for r in results}
    out = []
    targets = {"E8-top2": (1.0, 1.25), "E64-top8": (2.5, 1.5), "E128-top8": (2.5, None)}
    for case, (speedup_target, dense_target) in targets.items():
        if (case, "grouped") not in by:
            continue
        if (case, "hf_eager") in by:
            out.append((case, "speed-up over HF eager Mixtral block", by[(case, "hf_eager")] / by[(case, "grouped")],
                        f">= {speedup_target}x"))
        if (case, "dense") in by:
            out.append((case, "time / dense SwiGLU of equal active params", by[(case, "grouped")] / by[(case, "dense")],
                        f"<= {dense_target}x" if dense_target else "(no target)"))
    families: dict[str, list[Result]] = {}
    for r in results:
        if r.case.startswith("scale-") and r.impl == "grouped":
            families.setdefault(r.case.rsplit("-E", 1)[0], []).append(r)
    for family, rows in families.items():
        rows.sort(key=lambda r: r.num_experts)
        if len(rows) >= 2:
            out.append((f"{family}: E{rows[0].num_experts} -> E{rows[-1].num_experts}",
                        f"time ratio ({rows[0].tokens} tokens, top-{rows[0].top_k}, width {rows[0].expert_hidden})",
                        rows[-1].forward_backward_ms / rows[0].forward_backward_ms, "<= 1.2x"))
    return out


def print_table(results: list[Result], steps: list[dict], checks: list[tuple]) -> None:
    print(f"\n{'case':<22} {'impl':<11} {'fwd ms':>9} {'fwd+bwd ms':>11} {'saved MB':>9} {'peak MB':>9}")
    for r in results:
        peak = f"{r.peak_mb:9.0f}" if r.peak_mb is not None else f"{'-':>9}"
        print(f"{r.case:<22} {r.impl:<11} {r.forward_ms:9.2f} {r.forward_backward_ms:11.2f} {r.saved_mb:9.1f} {peak}")
    if steps:
        print(f"\n{'training step':<28} {'batch x seq':>12} {'ms':>9} {'tokens/s':>10} {'active params':>14} {'MFU':>6}")
        for s in steps:
            mfu = f"{100 * s['mfu']:5.1f}%" if s["mfu"] is not None else f"{'-':>6}"
            print(f"{s['preset']:<28} {s['batch']:>5} x {s['seq_len']:<4} {s['step_ms']:9.1f} "
                  f"{s['tokens_per_sec']:10.0f} {s['params_active'] / 1e6:13.2f}M {mfu}")
    if checks:
        print(f"\n{'case':<26} {'ratio (forward + backward)':<48} {'measured':>9}  target")
        for case, what, value, target in checks:
            print(f"{case:<26} {what:<48} {value:8.2f}x  {target}")


def run(args) -> dict:
    from moe_lab.training.runtime import retain_freed_memory

    retain_freed_memory()  # as `moe-lab train` does
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    cases = list(COMPARE_CASES) + list(SCALING_CASES) + (list(CAPACITY_CASES) if args.capacity else [])
    if args.quick:
        cases = [Case(c.name, 512, 128, c.num_experts, c.top_k, c.expert_hidden // 4, c.capacity_factor)
                 for c in cases[:3]]
    started = time.time()
    results: list[Result] = []
    for case in cases:
        with_loop = args.loop and case.num_experts <= 64 and case.tokens <= 4096
        results.extend(time_case(case, device, dtype, args.compare and not case.name.startswith("scale"), with_loop,
                                 args.warmup, args.repeats))
        print(f"moe-lab bench: {case.name} done ({time.time() - started:.0f}s)", flush=True)
    steps = []
    if not args.no_steps:
        presets = [("tiny", None), ("dense_tiny", None)] if device.type == "cpu" else [
            ("small", None), ("base", None), ("base", "dense")]
        batch, seq = (8, 256) if device.type == "cpu" else (16, 1024)
        if args.quick:
            presets, batch, seq = [("tiny", None)], 2, 64
        for preset, experts in presets:
            steps.append(time_training_step(preset, experts, batch, seq, device,
                                            "bf16" if device.type == "cuda" else "fp32", args.warmup, args.repeats))
    checks = ratios(results)
    print_table(results, steps, checks)
    report = {"machine": machine(), "device": str(device), "dtype": args.dtype, "seconds": round(time.time() - started, 1),
              "command": "moe-lab bench " + " ".join(args.argv), "cases": [asdict(r) for r in results],
              "training_steps": steps, "ratios": [dict(zip(("case", "comparison", "ratio", "target"), c))
                                                  for c in checks]}
    out = Path(args.out or f"benchmarks/results/{datetime.now():%Y-%m-%d_%H-%M-%S}").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in asdict(results[0]) if k != "extra"])
        writer.writeheader()
        for r in results:
            row = asdict(r)
            row.pop("extra")
            writer.writerow(row)
    print(f"\nmoe-lab bench: {len(results)} timings in {report['seconds']:.0f}s on {device} "
          f"({torch.get_num_threads()} threads); wrote {out}/bench.json and bench.csv")
    return report
