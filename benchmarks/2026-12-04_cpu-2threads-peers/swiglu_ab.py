"""The SwiGLU backward before and after the 2026-12-04 change, in whole training steps, interleaved in one process.

Usage: python swiglu_ab.py EXPERTS ROUNDS      e.g. python swiglu_ab.py e8 8
A dropless tiny model (moe-lab bench's exported pair) under bf16 autocast, eager and compiled, with the old backward
(sigmoid formula and torch.cat) and the new one (aten's silu_backward written in place in eager, the plain formula
under compile). A compiled copy keeps the backward it was traced with; an eager one reads the one set before its step.
"""

import copy
import statistics
import sys
import time

import torch

import moe_lab.model.experts as experts
from moe_lab.tools import bench, bench_baseline
from moe_lab.training.runtime import retain_freed_memory


def old_backward(ctx, grad_RF):
    h_RGF, scale_R = ctx.saved_tensors
    gate, up = h_RGF.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_scale = None
    if scale_R is not None:
        if ctx.needs_input_grad[1]:
            grad_scale = (grad_RF * up).mul_(silu).sum(-1)
        grad_RF = grad_RF * scale_R[:, None]
    grad_up = grad_RF * silu
    grad_gate = (grad_RF * up).mul_(sig).mul_(gate.sub(silu).add_(1.0))
    return torch.cat([grad_gate, grad_up], dim=-1), grad_scale


def main(experts_option: str, rounds: int) -> None:
    retain_freed_memory()
    torch.set_num_threads(2)
    model, _, _ = bench.exported_pair("tiny", experts_option, torch.device("cpu"))
    ids = torch.randint(0, 256, (8, 257))
    backwards = {"old": staticmethod(old_backward), "new": experts._ScaledSwiGLU.backward}
    steps = {}
    for name, backward in backwards.items():
        experts._ScaledSwiGLU.backward = backward
        for compiled in (False, True):
            copied = copy.deepcopy(model)
            optimizer = torch.optim.AdamW(copied.parameters(), lr=bench.STEP_LR)
            forward = torch.compile(copied) if compiled else copied
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
            step = bench.moe_lab_step(forward, ids[:, :-1], ids[:, 1:], optimizer, autocast)
            for _ in range(3):  # a compiled copy traces with this backward now
                step()
            steps[f"{name} {'compiled' if compiled else 'eager'}"] = (step, backward)

    def run(key: str) -> None:
        step, backward = steps[key]
        experts._ScaledSwiGLU.backward = backward
        step()

    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key in steps:
            run(key)
            start = time.perf_counter()
            for _ in range(3):
                run(key)
            times[key].append((time.perf_counter() - start) / 3)
    for key, seconds in times.items():
        print(key, round(1e3 * statistics.median(seconds), 1))
    print("eager old/new", bench_baseline.round_ratios(times["old eager"], times["new eager"]))
    print("compiled old/new", bench_baseline.round_ratios(times["old compiled"], times["new compiled"]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
