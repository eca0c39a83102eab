"""Each lever of the fast path alone and together: interleaved training steps of the default run's model and batch
(tiny, 16 x 256, AdamW, gradient clipping at 1.0), 2 threads.

Usage: python levers.py VARIANT,VARIANT,... [ROUNDS] [STEPS_PER_ROUND]
A variant's name holds its levers: fp32 | bf16 (autocast, float32 weights); _compile (torch.compile of the model);
_fused (AdamW fused=True); _unpadded (bf16 expert groups not padded to 64 rows: the state before the padding).
Each round times STEPS_PER_ROUND steps of every variant in turn; the ratio to the first variant is taken per round,
so the machine's drift cancels. Prints the median tokens/s with the lowest and highest round, and the ratio's median
with its lowest and highest round.
"""

import statistics
import sys
import time

import torch

import moe_lab.model.experts as experts
from moe_lab.tools.bench import compose_run
from moe_lab.tools.bench_baseline import StepSettings, training_step
from moe_lab.training.runtime import retain_freed_memory

PADDED = experts.group_alignment


def unpadded(device, dtype):
    return 1


def build(variant: str, run):
    settings = StepSettings(
        variant, "bf16-mixed" if "bf16" in variant else "32-true", "compile" in variant, "fused" in variant
    )
    step = training_step(run, settings, torch.device("cpu"))
    alignment = unpadded if "unpadded" in variant else PADDED

    def with_alignment():
        experts.group_alignment = alignment
        step()

    start = time.perf_counter()
    with_alignment()
    with_alignment()
    return with_alignment, time.perf_counter() - start


def main(variants: list[str], rounds: int, per_round: int) -> None:
    retain_freed_memory()
    torch.set_num_threads(2)
    run = compose_run("tiny", ["trainer.accelerator=cpu"])
    tokens = run.data.batch_size * run.data.seq_len
    steps = {}
    for variant in variants:
        steps[variant], warm = build(variant, run)
        print(f"{variant}: first two steps {warm:.1f}s", flush=True)
    times = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            start = time.perf_counter()
            for _ in range(per_round):
                steps[variant]()
            times[variant].append((time.perf_counter() - start) / per_round)
    base = variants[0]
    for variant in variants:
        per_sec = [tokens / t for t in times[variant]]
        ratio = [b / t for b, t in zip(times[base], times[variant])]
        print(
            f"{variant:<28} {statistics.median(per_sec):7.0f} tok/s [{min(per_sec):.0f}, {max(per_sec):.0f}]  "
            f"x{statistics.median(ratio):.2f} of {base} (per round {min(ratio):.2f}-{max(ratio):.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main(
        sys.argv[1].split(","),
        int(sys.argv[2]) if len(sys.argv) > 2 else 6,
        int(sys.argv[3]) if len(sys.argv) > 3 else 4,
    )
