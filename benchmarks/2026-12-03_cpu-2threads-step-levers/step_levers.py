"""Interleaved timing of training-step variants of the default tiny model (batch 8 x 256), 2 threads.

Usage: python step_levers.py VARIANT,VARIANT,... [ROUNDS] [STEPS_PER_ROUND]
A variant's name holds its levers: fp32 | bf16 (autocast), _compile (torch.compile of the model), _fused or _foreach
(AdamW). Each round times STEPS_PER_ROUND steps of every variant in turn (interleaved); the ratio to the first
variant is taken per round, so the machine's drift cancels.
"""

import statistics
import sys
import time

import torch

from moe_lab.model import MoETransformer
from moe_lab.tools.bench import compose_model, moe_lab_step
from moe_lab.training.runtime import retain_freed_memory

BATCH, SEQ = 8, 256


def build(variant: str):
    """One variant's training step, warmed up (two steps); returns (step, warm-up seconds)."""
    torch.manual_seed(0)
    model = MoETransformer(compose_model("tiny", []))
    optimizer_options = {key: True for key in ("fused", "foreach") if key in variant}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **optimizer_options)
    forward = torch.compile(model) if "compile" in variant else model
    ids = torch.randint(0, 256, (BATCH, SEQ + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in variant else None
    step = moe_lab_step(forward, ids[:, :-1], ids[:, 1:], optimizer, autocast)
    start = time.perf_counter()
    step()
    step()
    return step, time.perf_counter() - start


def main(variants: list[str], rounds: int, per_round: int) -> None:
    retain_freed_memory()
    torch.set_num_threads(2)
    steps = {}
    for variant in variants:
        steps[variant], warm = build(variant)
        print(f"{variant}: warm-up (2 steps) {warm:.1f}s", flush=True)
    times = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            start = time.perf_counter()
            for _ in range(per_round):
                steps[variant]()
            times[variant].append((time.perf_counter() - start) / per_round)
    base = variants[0]
    for variant in variants:
        tokens_per_sec = [BATCH * SEQ / t for t in times[variant]]
        ratios = [b / t for b, t in zip(times[base], times[variant])]
        print(
            f"{variant:<16} median {statistics.median(tokens_per_sec):8.0f} tok/s "
            f"[{min(tokens_per_sec):.0f}, {max(tokens_per_sec):.0f}]  x{statistics.median(ratios):.2f} of {base} "
            f"(per round {min(ratios):.2f}-{max(ratios):.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main(
        sys.argv[1].split(","),
        int(sys.argv[2]) if len(sys.argv) > 2 else 5,
        int(sys.argv[3]) if len(sys.argv) > 3 else 5,
    )
