"""The MoE training step against its dense twin of equal active parameters, on this CPU, as `moe-lab train` takes
it (the settings `trainer=auto` resolves to here), interleaved rounds with the spread, then a profile of the MoE step.

    python benchmarks/2026-12-06_cpu-moe-vs-dense/moe_vs_dense.py [ROUNDS]

Pairs: the default model (8 experts, top-2, width 384, capacity 1.25) against `model=dense_tiny` (FFN 768); 64
fine-grained experts (`experts=e64_fine`: top-8 of width 48) against `experts=dense` (FFN 384).
"""

from __future__ import annotations

import statistics
import sys

import torch

from moe_lab.tools.bench import baseline
from moe_lab.tools.bench.steps import compose_run

PAIRS = {
    "default (e8, top-2, cf 1.25)": (("tiny", []), ("dense_tiny", [])),
    "experts=e64_fine (top-8)": (("tiny", ["experts=e64_fine"]), ("tiny", ["experts=dense"])),
}


def main(rounds: int) -> None:
    device = torch.device("cpu")
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, 2 threads")
    for name, ((moe_preset, moe_over), (dense_preset, dense_over)) in PAIRS.items():
        moe_run, dense_run = compose_run(moe_preset, moe_over), compose_run(dense_preset, dense_over)
        settings = baseline.settings_here(moe_run)[1]
        steps = {
            "moe": baseline.training_step(moe_run, settings, device),
            "dense": baseline.training_step(dense_run, settings, device),
        }
        seconds = baseline.interleaved_seconds(steps, device, warmup=3, repeats=rounds)
        ratios = sorted(d / m for d, m in zip(seconds["dense"], seconds["moe"]))  # MoE tokens/s over dense's
        tokens = moe_run.data.batch_size * moe_run.data.seq_len
        print(
            f"{name}: {settings.name} ({settings.precision}, compile={settings.compile}); "
            f"MoE {tokens / statistics.median(seconds['moe']):.0f} tokens/s, "
            f"dense {tokens / statistics.median(seconds['dense']):.0f}; MoE / dense {statistics.median(ratios):.3f}x "
            f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f}, {len(ratios)} rounds)"
        )
        profile(name, steps["moe"], steps["dense"])


def profile(name: str, moe_step, dense_step) -> None:
    """Self CPU time by operation over 4 steps of each: where the MoE step's extra time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    totals = {}
    for which, step in (("moe", moe_step), ("dense", dense_step)):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(4):
                step()
        totals[which] = {e.key: e.self_cpu_time_total / 4 / 1e3 for e in prof.key_averages()}
    moe_ms, dense_ms = sum(totals["moe"].values()), sum(totals["dense"].values())
    print(f"  profile, ms per step (self CPU time): MoE {moe_ms:.1f}, dense {dense_ms:.1f}; the MoE step's top ops:")
    for key, ms in sorted(totals["moe"].items(), key=lambda kv: -kv[1])[:14]:
        print(f"    {key:<40} {ms:7.2f} ms   dense {totals['dense'].get(key, 0.0):7.2f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
