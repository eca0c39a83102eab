"""Per-expert groups against equal blocks (one batched GEMM), moe-lab's GroupedExperts forward + backward under
bfloat16 autocast on a CPU (float32 weights, as in training), a new routing every step (the same sequence for both
layouts), interleaved rounds. For each case and skew it prints the median times of groups, blocks and the automatic
choice ("auto": each expert's first `block` rows batched, the rest in per-expert GEMMs, the block chosen per step
from the row counts), the share of rows auto batched, and the per-round ratios groups/blocks (where it crosses 1 is
what BLOCK_ROW_COST and GROUP_GEMM_OVERHEAD_MACS were fitted to) and groups/auto (what the choice gains; at or
above 1 everywhere when it chooses well).

    python blocks_ab.py ROUNDS [CASE ...]    # cases: e64_fine (tiny's 64 x 48), tiny_e8 (8 x 384), layer_e64 (d512)
"""

import statistics
import sys
import time

import torch

from moe_lab.model.experts import GroupedExperts

# name -> (experts, top_k, d_model, expert hidden, tokens)
CASES = {
    "e64_fine": (64, 8, 128, 48, 2048),
    "tiny_e8": (8, 2, 128, 384, 2048),
    "layer_e64": (64, 8, 512, 256, 4096),
}
SKEWS = (0.0, 0.1, 0.2, 0.3, 0.4)
STEPS = 4


def routings(num_experts, slots, skew, n, seed=0):
    """Row counts per expert: multinomial draws from softmax(skew * normal) expert popularities."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(num_experts, generator=g) * skew, 0)
    return [torch.bincount(torch.multinomial(probs, slots, True, generator=g), minlength=num_experts) for _ in range(n)]


def batched_share(experts, counts, align=64):
    """The share of the rows that auto's layout puts in the batched GEMM."""
    experts.cpu_layout = "auto"
    block = experts._block_rows(counts, align)
    return float(counts.clamp(max=block).sum() / counts.sum())


def main():
    rounds = int(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    torch.set_num_threads(2)
    for name in names:
        E, K, D, FH, T = CASES[name]
        torch.manual_seed(0)
        experts = GroupedExperts(E, D, FH)
        x = torch.randn(T, D, requires_grad=True)
        for skew in SKEWS:
            plan = routings(E, T * K, skew, rounds * STEPS + 2)
            index = torch.randint(0, T, (T * K,))
            scale = torch.rand(T * K)

            def step(layout, counts):
                experts.cpu_layout = layout
                offs = torch.cumsum(counts, 0).to(torch.int32)
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = experts(x, offs, scale, index_R=index)
                y.float().square().mean().backward()
                x.grad = None
                experts.zero_grad(set_to_none=True)
                return time.perf_counter() - t

            layouts = ("groups", "blocks", "auto")
            for layout in layouts:
                step(layout, plan[0])
                step(layout, plan[1])
            times = {lay: [] for lay in layouts}
            for r in range(rounds):
                chunk = plan[2 + r * STEPS : 2 + (r + 1) * STEPS]
                order = layouts[r % 3 :] + layouts[: r % 3]
                for lay in order:
                    times[lay].append(1e3 * statistics.median(step(lay, c) for c in chunk))
            load = statistics.mean(float(c.max()) / (T * K / E) for c in plan)
            share = statistics.mean(batched_share(experts, c) for c in plan[2:])

            def ratio(a, b):
                r = [ta / tb for ta, tb in zip(times[a], times[b])]
                return f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})"

            med = {lay: statistics.median(times[lay]) for lay in layouts}
            print(
                f"{name} skew {skew}: max/mean rows {load:.2f}; ms groups {med['groups']:.1f}, blocks "
                f"{med['blocks']:.1f}, auto {med['auto']:.1f} ({100 * share:.0f}% of rows batched); "
                f"groups/blocks {ratio('groups', 'blocks')}, groups/auto {ratio('groups', 'auto')}",
                flush=True,
            )


if __name__ == "__main__":
    main()
