"""The operations one forward + backward of an MoE layer issues (a proxy for the kernel launches that set a GPU's time
at small shapes): moe-lab's layer in training mode against transformers' grouped-experts Mixtral block, on the same
weights, in bfloat16 on the CPU, at the bench's 8-expert top-2 and 64-expert top-8 cases scaled down (512 tokens,
d_model 128, expert width / 4). Counts the aten operations called from Python or autograd, not those inside them.

    python benchmarks/2026-12-04_h200/count_ops.py [-v]
"""

import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from moe_lab.tools import bench, bench_peers


def outer_aten_ops(fn) -> collections.Counter:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = collections.Counter()
    for e in prof.events():
        outer = e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
        if e.name.startswith("aten::") and outer:
            ops[e.name] += 1
    return ops


def main() -> None:
    for name in ("E8-top2", "E64-top8"):
        c = next(c for c in bench.COMPARE_CASES if c.name == name)
        case = bench.Case(c.name, 512, 128, c.num_experts, c.top_k, c.expert_hidden // 4)
        ours = bench.moe_layer(case, "grouped", torch.device("cpu"), torch.bfloat16).train()
        hf = bench_peers.hf_grouped(ours, case, torch.device("cpu"), torch.bfloat16)
        x = torch.randn(1, case.tokens, case.d_model, dtype=torch.bfloat16, requires_grad=True)

        def step(layer):
            y = layer(x)
            (y[0] if isinstance(y, tuple) else y).float().sum().backward()

        for label, layer in (("moe-lab", ours), ("transformers grouped", hf)):
            ops = outer_aten_ops(lambda: step(layer))
            print(f"{name:<9} {label:<21} {sum(ops.values()):4d} aten operations")
            if "-v" in sys.argv:
                print("   ", ", ".join(f"{k[6:]} {v}" for k, v in ops.most_common()))


if __name__ == "__main__":
    main()
