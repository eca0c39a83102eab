"""`moe-lab bench --checkpointing`: the training step of a model preset under each `model.activation_checkpointing`
setting: its time (interleaved rounds, with the spread) and the peak memory of its activations and temporaries."""

from __future__ import annotations

import statistics

import torch

from moe_lab.model.config import ACTIVATION_CHECKPOINTING
from moe_lab.tools.bench import baseline as bench_baseline
from moe_lab.tools.bench.steps import compose_run


def peak_tensor_mb(step, device: torch.device) -> float:
    """MB of the activations and temporaries alive at the step's highest point: on a CPU from torch's memory profile
    of the step (its timeline of every tensor's allocation and release, by category: parameters, gradients and
    optimizer state left out); on a GPU the allocator's peak over what was allocated before the step (gradients
    included there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category, MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(str(device))
    kept = [Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE]
    columns = [_CATEGORY_TO_INDEX[c] + 1 for c in kept]  # column 0 of a row is its time
    return max(sum(row[1:]) - sum(row[c] for c in columns) for row in sizes) / 2**20


def compare(preset: str, device: torch.device, batch: int, seq_len: int, warmup: int, repeats: int) -> dict:
    """Each setting's step (as `moe-lab train` takes it, eager) timed in turns, and its peak tensor memory."""
    settings = {}
    runs = {}
    for mode in ACTIVATION_CHECKPOINTING:
        run = compose_run(preset, [f"model.activation_checkpointing={mode}", f"data.batch_size={batch}"])
        run.data.seq_len = seq_len
        runs[mode] = run
        step_settings = bench_baseline.StepSettings(mode, str(run.trainer["precision"]), False, bool(run.optim.fused))
        settings[mode] = bench_baseline.training_step(run, step_settings, device)
    seconds = bench_baseline.interleaved_seconds(settings, device, warmup, repeats)
    rows = []
    for mode, step in settings.items():
        ratios = sorted(s / n for s, n in zip(seconds[mode], seconds["none"]))
        rows.append(
            {
                "setting": mode,
                "step_ms": 1e3 * statistics.median(seconds[mode]),
                "time_vs_none": statistics.median(ratios),
                "time_vs_none_low": ratios[0],
                "time_vs_none_high": ratios[-1],
                "peak_mb": peak_tensor_mb(step, device),
            }
        )
    none_mb = rows[0]["peak_mb"]
    for row in rows:
        row["memory_vs_none"] = row["peak_mb"] / none_mb
    precision = str(runs["none"].trainer["precision"])
    return {"preset": preset, "batch": batch, "seq_len": seq_len, "precision": precision, "rows": rows}


def print_report(report: dict) -> None:
    print(
        f"\nactivation checkpointing, model={report['preset']}, batch {report['batch']} x {report['seq_len']}, "
        f"{report['precision']}, eager"
    )
    print(f"{'setting':<8} {'step ms':>9} {'time / none':>22} {'peak MB':>9} {'memory / none':>14}")
    for r in report["rows"]:
        spread = f"{r['time_vs_none']:.2f}x [{r['time_vs_none_low']:.2f}, {r['time_vs_none_high']:.2f}]"
        print(f"{r['setting']:<8} {r['step_ms']:9.1f} {spread:>22} {r['peak_mb']:9.1f} {r['memory_vs_none']:13.2f}x")
