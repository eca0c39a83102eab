"""The E8-top2 bfloat16 layer against torchtitan's, split into forward and backward, and moe-lab's layer with its
expert groups unpadded: where does the few percent between the two come from?

Usage: python layer_split.py [ROUNDS]      (8 rounds of 3 steps each by default)
"""

import statistics
import sys
import time

import torch

import moe_lab.model.experts as experts
from moe_lab.tools.bench import COMPARE_CASES, implementations
from moe_lab.training.runtime import retain_freed_memory


def main(rounds: int) -> None:
    retain_freed_memory()
    torch.set_num_threads(2)
    case = next(c for c in COMPARE_CASES if c.name == "E8-top2")
    torch.manual_seed(1)
    x = torch.randn(1, case.tokens, case.d_model, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    impls = implementations(case, torch.device("cpu"), torch.bfloat16, True, False, x, grad, [])
    padded = experts.group_alignment
    variants = {
        "moe-lab": (impls["grouped"][1], padded),
        "moe-lab unpadded": (impls["grouped"][1], lambda device, dtype: 1),
        "torchtitan": (impls["torchtitan"][1], padded),
    }
    split = {name: ([], []) for name in variants}
    total = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (forward, alignment) in variants.items():
            experts.group_alignment = alignment
            start = time.perf_counter()
            for _ in range(3):
                xi = x.detach().requires_grad_()
                t0 = time.perf_counter()
                y = forward(xi)
                t1 = time.perf_counter()
                y.backward(grad)
                split[name][0].append(1e3 * (t1 - t0))
                split[name][1].append(1e3 * (time.perf_counter() - t1))
            total[name].append(time.perf_counter() - start)
    experts.group_alignment = padded
    for name, (fwd, bwd) in split.items():
        ratios = sorted(t / m for t, m in zip(total[name], total["moe-lab"]))
        print(
            f"{name:<17} forward {statistics.median(fwd):6.1f} ms  backward {statistics.median(bwd):6.1f} ms  "
            f"round time / moe-lab's: {ratios[0]:.2f}-{ratios[-1]:.2f}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
