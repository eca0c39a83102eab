"""The MoE layer (forward + backward) against every peer that runs here, on the same weights, interleaved: is
moe-lab's layer slower than a peer at the same precision, beyond the run's noise?

Usage: python layer_rounds.py CASE DTYPE [ROUNDS] [fixed|fresh]     e.g. python layer_rounds.py E8-top2 float32 30
fixed (the default): every step on the same input, so the routing and each expert's row count never change (the
pure compute of one routing). fresh: every step on a new random input, as training steps are, so each expert's row
count changes from step to step (on a CPU, oneDNN builds a kernel for every new bfloat16 GEMM shape, which an
implementation pays unless it keeps the shapes few); drawing the input costs every implementation the same.
Each round times PER_ROUND forward + backward passes of each implementation in turn (the order rotates every round,
so no implementation always runs right after another). Per peer: the median time, the per-round ratio peer / moe-lab
(above 1: moe-lab faster), its lowest and highest round, and a 95% interval of the geometric mean ratio (a t interval
of the per-round log ratios): an interval above 1 says moe-lab's layer is faster beyond this run's noise.
Uses `moe-lab bench`'s cases, weights and same-math check (in bfloat16: on the tokens of unambiguous routing).
"""

import math
import statistics
import sys
import time

import torch
from scipy import stats

from moe_lab.tools.bench import COMPARE_CASES, implementations
from moe_lab.training.runtime import retain_freed_memory

PER_ROUND = 3


def interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high) of the ratios, 95% t interval on their logs."""
    logs = [math.log(r) for r in ratios]
    mean, sem = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    half = stats.t.ppf(0.975, len(logs) - 1) * sem
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def main(case_name: str, dtype_name: str, rounds: int, inputs: str = "fixed") -> None:
    retain_freed_memory()
    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    case = next(c for c in COMPARE_CASES if c.name == case_name)
    torch.manual_seed(1)
    x = torch.randn(1, case.tokens, case.d_model, dtype=dtype)
    grad = torch.randn_like(x)
    not_timed = []
    impls = implementations(case, torch.device("cpu"), dtype, True, False, x, grad, not_timed)
    for n in not_timed:
        print(f"{case_name} {dtype_name} not timed: {n['impl']}: {n['reason'][:160]}")
    names = [n for n in impls if n != "dense"]
    for n in names[1:]:
        print(f"{case_name} {dtype_name} {n}: {impls[n][2]}")

    def step(forward):
        xi = x if inputs == "fixed" else torch.randn(x.shape, dtype=dtype)
        forward(xi.detach().requires_grad_()).backward(grad)

    steps = {n: (lambda f=impls[n][1]: step(f)) for n in names}
    for s in steps.values():
        s(), s(), s()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            start = time.perf_counter()
            for _ in range(PER_ROUND):
                steps[n]()
            times[n].append((time.perf_counter() - start) / PER_ROUND * 1e3)
    for n in names:
        ratio = [p / g for p, g in zip(times[n], times["grouped"])]
        mean, low, high = interval(ratio) if n != "grouped" else (1.0, 1.0, 1.0)
        print(
            f"{case_name} {dtype_name} {inputs} {n:<11} median {statistics.median(times[n]):7.2f} ms "
            f"[{min(times[n]):.2f}, {max(times[n]):.2f}]  {n} / moe-lab: median {statistics.median(ratio):.2f}x "
            f"(per round {min(ratio):.2f}-{max(ratio):.2f}), geometric mean {mean:.3f}x, 95% [{low:.3f}, {high:.3f}]"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 20, *sys.argv[4:5])
