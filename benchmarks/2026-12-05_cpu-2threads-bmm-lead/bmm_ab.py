"""A lead for issue 25's E64 eager bar (built later: ../2026-12-05_cpu-2threads-blocks/): SwiGLU experts forward +
backward in bfloat16 at 64 experts top-8 (width 48, d_model 128, 2048 tokens) as moe-lab computed them on a CPU
(torch._grouped_mm, one GEMM per expert, each group padded to 64 rows) against one torch.bmm over the experts
padded to the largest group (rounded up to 64 rows, so that oneDNN's kernels stay cached as the groups change).
Every step draws a new routing (the same sequence for both), with the experts' loads skewed by SKEW (max/mean rows
printed). Interleaved rounds.

    python bmm_ab.py SKEW ROUNDS      # e.g. 0.02 (a balanced, trained router) or 0.3 (a skewed one)
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

T, K, E, D, FH = 2048, 8, 64, 128, 48
DT = torch.bfloat16


def routings(skew: float, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(E, generator=g) * skew, 0)
    return [torch.bincount(torch.multinomial(probs, T * K, True, generator=g), minlength=E) for _ in range(n)]


def grouped(x_RD, counts, w13, w2):
    padded = (counts + 63) // 64 * 64
    starts = torch.cumsum(padded, 0) - padded
    e = torch.repeat_interleave(torch.arange(E), counts)
    row = starts[e] + torch.arange(len(e)) - (torch.cumsum(counts, 0) - counts)[e]
    xp = x_RD.new_zeros(int(padded.sum()), D).index_copy(0, row, x_RD)
    offs = torch.cumsum(padded, 0).to(torch.int32)
    g, u = torch._grouped_mm(xp, w13, offs=offs).chunk(2, -1)
    return torch._grouped_mm(F.silu(g) * u, w2, offs=offs)[row]


def batched(x_RD, counts, w13, w2):
    m = (int(counts.max()) + 63) // 64 * 64
    e = torch.repeat_interleave(torch.arange(E), counts)
    pos = torch.arange(len(e)) - (torch.cumsum(counts, 0) - counts)[e]
    xp = x_RD.new_zeros(E, m, D).index_put((e, pos), x_RD)
    g, u = torch.bmm(xp, w13).chunk(2, -1)
    return torch.bmm(F.silu(g) * u, w2)[e, pos]


def main() -> None:
    skew, rounds = float(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    w13 = torch.randn(E, D, 2 * FH, dtype=DT, requires_grad=True)
    w2 = torch.randn(E, FH, D, dtype=DT, requires_grad=True)
    x = torch.randn(T * K, D, dtype=DT, requires_grad=True)
    steps = 4
    plan = routings(skew, rounds * steps + 2)
    loads = [float(c.max()) / (T * K / E) for c in plan]
    print(
        f"skew {skew}: max/mean rows per expert {statistics.mean(loads):.2f} (range {min(loads):.2f}-{max(loads):.2f})"
    )
    same = (grouped(x, plan[0], w13, w2).float() - batched(x, plan[0], w13, w2).float()).abs().max().item()
    print(f"largest output difference between the two: {same}")

    def timed(fn, counts):
        t = time.perf_counter()
        fn(x, counts, w13, w2).float().square().mean().backward()
        x.grad = w13.grad = w2.grad = None
        return time.perf_counter() - t

    for fn in (grouped, batched):
        timed(fn, plan[1])
    ratios = []
    for r in range(rounds):
        chunk = plan[2 + r * steps : 2 + (r + 1) * steps]
        order = (grouped, batched) if r % 2 == 0 else (batched, grouped)
        ms = {fn.__name__: 1e3 * statistics.median(timed(fn, c) for c in chunk) for fn in order}
        ratios.append(ms["grouped"] / ms["batched"])
        print(f"  round {r}: grouped {ms['grouped']:.1f} ms, batched {ms['batched']:.1f} ms")
    print(
        f"grouped / batched time: median {statistics.median(ratios):.3f}, per round {min(ratios):.3f}-{max(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
