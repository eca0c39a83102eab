"""Where the default step's time goes here: the step (bf16-mixed compiled fused AdamW, or float32 eager) timed over 6
steps, then self CPU time by operation over 3 (inductor's kernels named: cpp.enable_kernel_profile).

    python profile_step.py default|f32 [OVERRIDES...]
"""

import sys
import time

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from moe_lab.tools.bench.baseline import StepSettings, training_step
from moe_lab.tools.bench.steps import compose_run


def main() -> None:
    torch.set_num_threads(2)
    inductor_config.cpp.enable_kernel_profile = True
    kind = sys.argv[1]
    settings = {
        "default": StepSettings("default", "bf16-mixed", True, True),
        "f32": StepSettings("float32 eager", "32-true", False, False),
    }[kind]
    step = training_step(compose_run("tiny", sys.argv[2:]), settings, torch.device("cpu"))
    for _ in range(4):
        step()
    start = time.perf_counter()
    for _ in range(6):
        step()
    seconds = (time.perf_counter() - start) / 6
    print(f"{kind}: {1e3 * seconds:.1f} ms per step, {4096 / seconds:.0f} tokens/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
