"""Profile one forward + backward of the MoE layer: moe-lab, hf_grouped and torchtitan on the same weights.

python profile_layer.py E TOP_K WIDTH [bf16]      # e.g. 8 2 1024 (needs the bench-peers extra)
"""

import sys

import torch

torch.set_num_threads(2)
from moe_lab.tools import bench_peers as bp
from moe_lab.tools.bench import Case, median_ms, moe_layer
from moe_lab.training.runtime import retain_freed_memory

retain_freed_memory()
E, K, F = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dtype = torch.bfloat16 if len(sys.argv) > 4 and sys.argv[4] == "bf16" else torch.float32
case = Case("c", 4096, 512, E, K, F)
dev = torch.device("cpu")
layer = moe_layer(case, "grouped", dev, dtype)
impls = {"moe-lab": lambda t: layer(t)[0]}
for name in ("hf_grouped", "torchtitan"):
    m = bp.PEERS[name](layer, case, dev, dtype)
    impls[name] = m
x = torch.randn(1, 4096, 512, dtype=dtype, requires_grad=True)
g = torch.randn_like(x)
from torch.profiler import ProfilerActivity, profile

for name, f in impls.items():

    def step():
        x.grad = None
        f(x).backward(g)

    for _ in range(2):
        step()
    ms = median_ms(step, dev, 1, 5)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        step()
    print("=====", name, f"{ms:.1f} ms")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
