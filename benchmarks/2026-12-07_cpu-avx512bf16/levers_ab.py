"""Levers tried on the default step here (bf16-mixed, compiled, fused AdamW; the tiny model, batch 16 x 256), each
against the step as it is, interleaved in one process: a global flag read while tracing gives one compiled graph per
value (dynamo guards on it), and rounds alternate the order. Prints the median step time of each and the median
per-round ratio (as-is time / lever time; > 1: the lever is faster) with the second-lowest and second-highest round.

    python levers_ab.py LEVER [OVERRIDES...]
    LEVER  fp32_attention: causal attention's flash kernel in float32 (inputs upcast) instead of bfloat16
           eager_experts:  the expert bank run eagerly inside the compiled model (torch.compiler.disable), so that
                           the batched/grouped layout is chosen per call as in eager bf16
           capacity_blocks: under a capacity factor, each expert's rows in a static block of C rows (C rounded up to
                           64; C = ceil(cf T K / E) bounds every expert's kept rows) and all experts as one batched
                           GEMM, host-free, inside the compiled model (instead of the per-expert grouped GEMMs)
           index_add_sums: the step as it was before the sums by gather (expert_kernels.TokenRows): each token's rows
                           summed by index-add in the combine and in the experts' source gradient, and the padded
                           rows' backward an index-add; as is / lever < 1: the sums by gather are faster
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import moe_lab.model.attention as attention
import moe_lab.model.dispatch as dispatch
import moe_lab.model.expert_kernels as expert_kernels
from moe_lab.model.expert_kernels import AlignedGroups, round_up
from moe_lab.model.experts import GroupedExperts
from moe_lab.model.moe import expert_capacity
from moe_lab.tools.bench.baseline import StepSettings, training_step
from moe_lab.tools.bench.steps import compose_run

LEVER_ON = {"on": False}
ROUNDS, STEPS = 12, 3


def fp32_attention() -> None:
    sdpa = F.scaled_dot_product_attention

    def dispatch(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        if LEVER_ON["on"] and attn_mask is None and is_causal and not enable_gqa:
            return sdpa(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)

    class Functional:
        def __getattr__(self, name):
            return dispatch if name == "scaled_dot_product_attention" else getattr(F, name)

    attention.F = Functional()


def eager_experts() -> None:
    compiled_forward = GroupedExperts.forward
    eager_forward = torch.compiler.disable(compiled_forward)

    def forward(self, *args, **kwargs):
        return (eager_forward if LEVER_ON["on"] else compiled_forward)(self, *args, **kwargs)

    GroupedExperts.forward = forward


def capacity_blocks(run) -> None:
    moe = run.model.moe
    tokens = run.data.batch_size * run.data.seq_len
    capacity = expert_capacity(moe.capacity_factor, tokens, moe.router.top_k, moe.num_experts, moe.min_capacity)
    block = round_up(capacity, 64)
    print(f"capacity {capacity} rows per expert, block {block}")
    grouped = expert_kernels.aligned_groups

    def aligned_groups(offs_E, num_rows, align, macs_per_row, layout="auto"):
        if LEVER_ON["on"] and torch.compiler.is_compiling():
            return AlignedGroups.of(offs_E, num_rows, align, block, offs_E.shape[0] * block + num_rows)
        return grouped(offs_E, num_rows, align, macs_per_row, layout)

    expert_kernels.aligned_groups = aligned_groups


def index_add_sums() -> None:
    token_rows_of, select = dispatch.token_rows_of, expert_kernels.select_distinct_rows

    def no_token_rows(routing, plan):
        return None if LEVER_ON["on"] else token_rows_of(routing, plan)

    def select_rows(v_PD, position_R):
        return v_PD.index_select(0, position_R) if LEVER_ON["on"] else select(v_PD, position_R)

    dispatch.token_rows_of = no_token_rows
    expert_kernels.select_distinct_rows = select_rows


def main() -> None:
    lever = sys.argv[1]
    run = compose_run("tiny", sys.argv[2:])
    if lever == "capacity_blocks":
        capacity_blocks(run)
    else:
        {"fp32_attention": fp32_attention, "eager_experts": eager_experts, "index_add_sums": index_add_sums}[lever]()
    torch.set_num_threads(2)
    settings = StepSettings("default", "bf16-mixed", True, True)
    step = training_step(run, settings, torch.device("cpu"))
    for on in (False, True):
        LEVER_ON["on"] = on
        for _ in range(4):
            step()
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(ROUNDS):
        for on in (False, True) if r % 2 == 0 else (True, False):
            LEVER_ON["on"] = on
            start = time.perf_counter()
            for _ in range(STEPS):
                step()
            times[on].append((time.perf_counter() - start) / STEPS)
    ratios = sorted(a / b for a, b in zip(times[False], times[True]))
    print(
        f"{lever} {sys.argv[2:]}: as is {1e3 * statistics.median(times[False]):.1f} ms, with the lever "
        f"{1e3 * statistics.median(times[True]):.1f} ms; as is / lever {statistics.median(ratios):.3f} "
        f"[{ratios[1]:.3f}, {ratios[-2]:.3f}], {ROUNDS} rounds"
    )


if __name__ == "__main__":
    main()
