"""Is the batched/grouped cost model (fitted on AMX) right on this CPU? GroupedExperts forward + backward (bfloat16
autocast, float32 weights, 2 threads, uncompiled) on one fixed routing at every batched block size, from 0 (every row
in per-expert GEMMs) to the largest group (every row in one batched GEMM), and the block the cost model in
moe_lab/model/expert_kernels.py picks ("auto"). Blocks are timed in rotating order, the median of 3 steps per round,
the median over rounds printed, and auto's time over the best block's.
`../2026-12-05_cpu-2threads-blocks/split_curve.py` (the AMX fit's curve) ported to today's API: that folder's scripts
stay as they ran at their commit (`experts._block_rows` is now `expert_kernels.block_rows`).

    python split_curve.py EXPERTS TOP_K D_MODEL HIDDEN TOKENS SKEW ROUNDS
    e.g. python split_curve.py 8 2 128 384 2048 0.0 7     (tiny's 8 experts, balanced)
"""

import statistics
import sys
import time

import torch

from moe_lab.model.expert_kernels import block_rows
from moe_lab.model.experts import GroupedExperts


def main() -> None:
    E, K, D, FH, T = (int(a) for a in sys.argv[1:6])
    skew, rounds = float(sys.argv[6]), int(sys.argv[7])
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(E, generator=g) * skew, 0)
    counts = torch.bincount(torch.multinomial(probs, T * K, True, generator=g), minlength=E)
    print(f"rows per expert: largest / mean {counts.max().item() / counts.float().mean().item():.2f}")
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, FH)
    x = torch.randn(T, D, requires_grad=True)
    index, scale = torch.randint(0, T, (T * K,)), torch.rand(T * K)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    largest = -(-int(counts.max()) // 64) * 64
    auto = block_rows(counts, 64, experts.macs_per_row)

    def step(block: int) -> float:
        experts.cpu_layout = block
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = experts(x, offs, scale, index_R=index)
        y.float().square().mean().backward()
        x.grad = None
        experts.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    blocks = list(range(0, largest + 1, 64))
    for block in blocks:
        step(block)
        step(block)
    times: dict[int, list[float]] = {block: [] for block in blocks}
    for r in range(rounds):
        for block in blocks[r % len(blocks) :] + blocks[: r % len(blocks)]:
            times[block].append(statistics.median(step(block) for _ in range(3)))
    median = {block: 1e3 * statistics.median(times[block]) for block in blocks}
    for block in blocks:
        rest = (counts - block).clamp(min=0)
        tag = " (auto)" if block == auto else "       "
        past, padded = int((rest > 0).sum()), int(((rest + 63) // 64 * 64).sum())
        print(f"block {block:5d}{tag}: {median[block]:6.2f} ms; experts past the block {past}, rows padded {padded}")
    best = min(median, key=median.__getitem__)
    print(f"auto {auto} / best {best}: {median[auto] / median[best]:.3f}x the best block's time")


if __name__ == "__main__":
    main()
