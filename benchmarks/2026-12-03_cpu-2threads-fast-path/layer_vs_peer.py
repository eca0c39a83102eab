"""The MoE layer (forward + backward) against transformers' grouped experts on the same weights, interleaved: is
moe-lab's layer slower than a peer at the same precision, within a run's noise or not?

Usage: python layer_vs_peer.py CASE DTYPE [ROUNDS]     e.g. python layer_vs_peer.py E8-top2 float32 10
Each round times 3 forward + backward passes of each implementation in turn; the ratio (peer time / moe-lab time,
above 1 = moe-lab faster) is taken per round. Uses `moe-lab bench`'s cases, weights and same-math check.
"""

import statistics
import sys
import time

import torch

from moe_lab.tools.bench import COMPARE_CASES, implementations
from moe_lab.training.runtime import retain_freed_memory

PER_ROUND = 3


def main(case_name: str, dtype_name: str, rounds: int) -> None:
    retain_freed_memory()
    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    case = next(c for c in COMPARE_CASES if c.name == case_name)
    device = torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randn(case.tokens, case.d_model, dtype=dtype).view(1, case.tokens, case.d_model)
    grad = torch.randn_like(x)
    not_timed = []
    impls = implementations(case, device, dtype, True, False, x, grad, not_timed)
    for n in not_timed:
        print("not timed:", n["impl"], n["reason"][:120])
    names = [n for n in ("grouped", "hf_grouped", "hf_eager") if n in impls]

    def step(forward):
        xi = x.detach().requires_grad_()
        forward(xi).backward(grad)

    steps = {n: (lambda f=impls[n][1]: step(f)) for n in names}
    for s in steps.values():
        s(), s()
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n, s in steps.items():
            start = time.perf_counter()
            for _ in range(PER_ROUND):
                s()
            times[n].append((time.perf_counter() - start) / PER_ROUND * 1e3)
    for n in names:
        ratio = sorted(p / g for p, g in zip(times[n], times["grouped"]))
        print(
            f"{case_name} {dtype_name} {n:<11} median {statistics.median(times[n]):7.2f} ms "
            f"[{min(times[n]):.2f}, {max(times[n]):.2f}]  {n} / moe-lab: {statistics.median(ratio):.2f}x "
            f"(per round {ratio[0]:.2f}-{ratio[-1]:.2f})"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 10)
