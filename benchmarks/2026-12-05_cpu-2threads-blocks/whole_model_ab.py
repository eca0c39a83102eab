"""Each change alone in the whole-model eager step (bf16 autocast, 8 x 256 tokens, forward + backward + AdamW, the
`moe-lab bench --compare` pair at initialisation), interleaved with transformers' step on the same weights:
    before     per-expert GEMMs only, the SwiGLU on the strided gate (the code of 2026-12-04)
    gate       per-expert GEMMs only, the narrow gate copied to be contiguous
    now        the batched layout chosen per call, and the gate copy (the code now)
    hf         transformers' Mixtral export of the same model

    python whole_model_ab.py EXPERTS ROUNDS      # e.g. e64_fine 8
"""

import statistics
import sys
import time

import torch

import moe_lab.model.experts as experts_module
from moe_lab.tools.bench import STEP_LR, exported_pair, hf_step, moe_lab_step
from moe_lab.training.runtime import retain_freed_memory


def main() -> None:
    experts, rounds = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(2)
    retain_freed_memory()
    model, hf, _ = exported_pair("tiny", experts, torch.device("cpu"))
    hf.config.output_router_logits = True
    ids = torch.randint(0, 256, (8, 257))

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    ours = moe_lab_step(model, ids[:, :-1], ids[:, 1:], torch.optim.AdamW(model.parameters(), lr=STEP_LR), autocast())
    theirs = hf_step(hf, ids[:, :-1], ids[:, 1:], torch.optim.AdamW(hf.parameters(), lr=STEP_LR), autocast())

    def setting(layout: str, narrow_width: int):
        def step():
            experts_module.NARROW_GATE_WIDTH = narrow_width
            for module in model.modules():
                if isinstance(module, experts_module.GroupedExperts):
                    module.cpu_layout = layout
            ours()

        return step

    arms = {"before": setting("groups", 0), "gate": setting("groups", 128), "now": setting("auto", 128), "hf": theirs}
    names = list(arms)
    for step in arms.values():
        step()
        step()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            per_step = []
            for _ in range(3):
                t = time.perf_counter()
                arms[name]()
                per_step.append(time.perf_counter() - t)
            times[name].append(statistics.median(per_step))
    for name in names:
        print(f"{experts} {name}: {1e3 * statistics.median(times[name]):.1f} ms")
    for a, b in [("before", "gate"), ("gate", "now"), ("before", "now"), ("hf", "before"), ("hf", "now")]:
        ratios = [x / y for x, y in zip(times[a], times[b])]
        print(f"{experts} {a} / {b}: {statistics.median(ratios):.3f} (per round {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
