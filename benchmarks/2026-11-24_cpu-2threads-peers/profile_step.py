"""Profile one training step (forward, backward, AdamW; 8 x 256 tokens) of model=tiny and model=dense_tiny.

python profile_step.py
"""

import torch

torch.set_num_threads(2)
from moe_lab.model import MoETransformer
from moe_lab.tools.bench import compose_model, median_ms
from moe_lab.training.runtime import retain_freed_memory

retain_freed_memory()
from torch.profiler import ProfilerActivity, profile

ids = torch.randint(0, 256, (8, 257))
for preset in ("tiny", "dense_tiny"):
    cfg = compose_model(preset, [])
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = model(ids[:, :-1], ids[:, 1:])
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    ms = median_ms(step, torch.device("cpu"), 1, 9)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        step()
    print("=====", preset, f"{ms:.1f} ms")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
