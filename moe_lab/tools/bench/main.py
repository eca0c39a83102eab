"""`moe-lab bench` itself: which cases, steps and models its arguments ask for, timed in turn, then the report."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Optional

import torch

from moe_lab.tools.bench import baseline as bench_baseline
from moe_lab.tools.bench.cases import CAPACITY_CASES, COMPARE_CASES, SCALING_CASES, VEOMNI_CASE, Case, Result
from moe_lab.tools.bench.layer import time_case
from moe_lab.tools.bench.peaks import PEAK_DTYPES, machine, machine_peaks, with_fractions_of_peak
from moe_lab.tools.bench.report import print_peaks, print_table, ratios, write_report
from moe_lab.tools.bench.steps import compose_model, compose_run, time_training_step, time_whole_model_vs_hf


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
    from moe_lab.training.auto import can_build_cpu_kernels

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
    interleaved (baseline.py)."""
    started = time.time()
    run = compose_run("tiny", [f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"])
    peaks = machine_peaks(
        device, (run.data.batch_size * run.data.seq_len, run.model.d_model, run.model.ffn_hidden), 3, 10
    )
    baseline = bench_baseline.compare(run, device, args.warmup, args.repeats, peaks)
    print_peaks(peaks)
    bench_baseline.print_report(baseline)
    return written(args, device, started, {"gemm_peaks": peaks, "baseline": baseline})


def measure_checkpointing(args, device: torch.device) -> dict:
    """`moe-lab bench --checkpointing`: model=small's step under each activation-checkpointing setting
    (checkpointing.py); tiny at a small batch with --quick."""
    from moe_lab.tools.bench import checkpointing

    started = time.time()
    preset, batch, seq = (
        ("tiny", 2, 64) if args.quick else ("small", 4, 512) if device.type == "cpu" else ("small", 16, 1024)
    )
    result = checkpointing.compare(preset, device, batch, seq, args.warmup, args.repeats)
    checkpointing.print_report(result)
    return written(args, device, started, {"activation_checkpointing": result})


def written(args, device: torch.device, started: float, measured: dict) -> dict:
    """A single-purpose run's bench.json (--baseline, --checkpointing): the machine, the command, what it measured."""
    report = {
        "machine": machine(),
        "device": str(device),
        "seconds": round(time.time() - started, 1),
        "command": "moe-lab bench " + " ".join(args.argv),
        **measured,
    }
    out = write_report(report, [], args.out)
    print(f"\nmoe-lab bench: {time.time() - started:.0f}s on {device} ({torch.get_num_threads()} threads); wrote {out}")
    return report


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
    if device.type == "cuda" and not args.quick:
        cases.append(VEOMNI_CASE)  # reported in TFLOP/s of its expert GEMMs (report.py)
    if args.quick:
        cases = [
            Case(c.name, 512, 128, c.num_experts, c.top_k, c.expert_hidden // 4, c.capacity_factor) for c in cases[:3]
        ]
    if args.baseline:
        return measure_baseline(args, device)
    if getattr(args, "checkpointing", False):
        return measure_checkpointing(args, device)
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
