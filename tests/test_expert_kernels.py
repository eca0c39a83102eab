"""The experts' speed layer (`moe_lab/model/expert_kernels.py`): each kernel computes the function of the plain
form, its gradients included, and the layout choices give the unpadded experts."""

from __future__ import annotations

import pytest
import torch

import moe_lab.model.experts as experts_module
from moe_lab.model.dispatch import LocalDispatcher, plan_dispatch, token_rows_of
from moe_lab.model.expert_kernels import (
    AlignedGroups,
    TokenRows,
    aligned_groups,
    gather_grouped_mm,
    group_alignment,
    grouped_mm,
    scaled_swiglu,
    select_distinct_rows,
    sum_token_rows,
    swiglu_backward_for_inductor,
)
from moe_lab.model.experts import GroupedExperts, apply_activation
from moe_lab.model.routers import Routing


@pytest.mark.parametrize("width", [6, 130])  # a narrow gate is copied to be contiguous, a wide one is not
def test_fused_swiglu_matches_autograd_and_passes_gradcheck(width):
    h = torch.randn(3, 2 * width, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, s: scaled_swiglu(h, s), (h, scale))
    assert torch.autograd.gradcheck(lambda h: scaled_swiglu(h, None), (h,))
    torch.testing.assert_close(scaled_swiglu(h, scale), apply_activation(h, "swiglu") * scale[:, None])


@pytest.mark.parametrize("width", [16, 130])  # the narrow gate is copied, the wide one is not
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_gives_each_row_the_same_bits_whatever_the_row_count(dtype, width):
    """Expert parallelism splits the experts' rows over calls (per-rank parts) and promises the numbers of one call:
    the narrow gate's copy must not leave a length-dependent tail to aten's scalar loop, whose exp rounds
    differently. Rows [0, n) computed alone equal the same rows of the whole, bit for bit, forward and backward, on
    two threads and past aten's parallel grain (3001 x 16 elements)."""
    torch.manual_seed(0)
    h_all = torch.randn(3001, 2 * width).to(dtype)
    scale_all, grad_all = torch.rand(3001).to(dtype), torch.randn(3001, width).to(dtype)

    def outputs(rows):
        h, scale = h_all[:rows].clone().requires_grad_(), scale_all[:rows].clone().requires_grad_()
        y = scaled_swiglu(h, scale)
        y.backward(grad_all[:rows])
        return y, h.grad, scale.grad

    whole = outputs(3001)
    for rows in (1, 5, 1000, 2047, 3000):
        for part, full in zip(outputs(rows), whole):
            assert torch.equal(part, full[:rows]), rows


@pytest.mark.parametrize("width", [6, 130])
def test_fused_swiglu_backward_is_the_same_under_compile(width):
    """Under torch.compile the backward takes the plain elementwise form inductor fuses; it is eager's gradient."""
    h = torch.randn(9, 2 * width, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(9, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(9, width, dtype=torch.float64)
    for s in (scale, None):
        eager = torch.autograd.grad(scaled_swiglu(h, s), [h] + ([s] if s is not None else []), grad)
        plain = swiglu_backward_for_inductor(h.detach(), None if s is None else s.detach(), grad, s is not None)
        torch.testing.assert_close(plain[0], eager[0])
        if s is not None:
            torch.testing.assert_close(plain[1], eager[1])


def test_gather_grouped_mm_matches_autograd_of_gather_then_gemm():
    """The fused gather + grouped GEMM (which keeps the source, not the gathered rows) has autograd's gradients;
    rows past the last group end (dropped slots) point at a spare source row, as the dispatcher arranges."""
    torch.manual_seed(0)
    S, I, O, E = 10, 8, 12, 3  # grouped_mm wants 16-byte strides
    src = torch.randn(S + 1, I, dtype=torch.float32)
    src[S] = 0  # the spare row
    index = torch.tensor([3, 0, 7, 7, 1, 9, 2, 4, 4, 5, 8, S, S])  # R = 13, two past the end
    offs = torch.tensor([4, 4, 11], dtype=torch.int32)  # an expert with no rows
    w = torch.randn(E, O, I)
    grad = torch.randn(len(index), O)
    grad[11:] = 0  # undefined rows: the layer gives them weight 0

    results = []
    for fused in (True, False):
        src_ = src.clone().requires_grad_(True)
        w_ = w.clone().requires_grad_(True)
        y = gather_grouped_mm(src_, index, w_, offs) if fused else grouped_mm(src_.index_select(0, index), w_, offs)
        y[:11].backward(grad[:11])
        results.append((y[:11].detach(), src_.grad[:S], w_.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def token_choice_with_drops(T: int = 6, K: int = 3, E: int = 4, capacity: int = 3):
    """A token-choice routing of T tokens x K slots over E experts whose capacity drops some slots, its plan, and
    the combine's token index (dropped rows point at the spare row T)."""
    torch.manual_seed(0)
    experts_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    routing = Routing.from_token_choice(experts_TK, torch.rand(T, K), E)
    plan = plan_dispatch(routing.expert_N, E, capacity)
    assert plan.row_kept_R is not None and not bool(plan.row_kept_R.all())  # some slots are dropped
    token_R = torch.where(plan.row_kept_R, routing.tokens_of(plan.row_slot_R), T)
    return routing, plan, token_R


def test_each_tokens_rows_summed_by_gather_are_the_index_add():
    """TokenRows inverts the rows' token index: the gather-and-sum gives index_add's sums, dropped rows (undefined:
    NaN here) add nothing, and the source gradient of the gathering GEMM is index_add's, zero on the spare rows."""
    routing, plan, token_R = token_choice_with_drops()
    T, R = routing.num_tokens, plan.row_slot_R.shape[0]
    rows = TokenRows(torch.empty_like(plan.row_slot_R).scatter_(0, plan.row_slot_R, torch.arange(R)), None, T)
    rows = TokenRows(rows.row_N, plan.row_kept_R[rows.row_N], T)
    y_RD = torch.randn(R, 8)
    y_RD[~plan.row_kept_R] = float("nan")
    want = torch.zeros(T + 1, 8).index_add_(0, token_R, y_RD.nan_to_num(0.0))[:T]
    torch.testing.assert_close(sum_token_rows(y_RD, rows), want)

    src = torch.randn(T + 1, 16)
    src[T] = 0  # the spare row
    w, offs = torch.randn(4, 12, 16), plan.offs_E
    grads = []
    for token_rows in (None, rows):
        src_ = src.clone().requires_grad_(True)
        out = gather_grouped_mm(src_, token_R, w, offs, 0, token_rows)
        kept = int(offs[-1])
        out[:kept].backward(torch.ones(kept, 12))
        grads.append(src_.grad)
    torch.testing.assert_close(grads[1][:T], grads[0][:T])
    assert bool((grads[1][T:] == 0).all())


def test_the_compiled_combine_sums_each_tokens_rows_as_the_eager_one():
    """Under torch.compile the local dispatcher combines token choice's rows by gather (token_rows_of); eager by
    index-add. The same sums and gradients, with drops."""
    routing, plan, token_R = token_choice_with_drops()
    assert token_rows_of(routing, plan) is None  # eager: the index-add
    assert torch.compile(lambda: token_rows_of(routing, plan) is not None, fullgraph=True)()  # compiled: the gather
    x_TD = torch.randn(routing.num_tokens, 8)
    y_RD = torch.randn(plan.row_slot_R.shape[0], 8)

    def combined(y):
        dispatcher = LocalDispatcher()
        return dispatcher.combine(y, dispatcher.dispatch(x_TD, routing, plan))

    results = []
    for fn in (combined, torch.compile(combined, fullgraph=True)):
        y = y_RD.clone().requires_grad_(True)
        out = fn(y)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out))
        results.append((out.detach(), y.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_distinct_rows_selected_under_compile_have_index_selects_gradient():
    torch.manual_seed(0)
    position = torch.randperm(20)[:13]
    grads = []
    for fn in (lambda v: v.index_select(0, position), torch.compile(lambda v: select_distinct_rows(v, position))):
        v = torch.randn(20, 4, requires_grad=True)
        fn(v).backward(torch.randn(13, 4, generator=torch.Generator().manual_seed(1)))
        grads.append(v.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("layout", ["groups", "blocks", 64])
@pytest.mark.parametrize("index", [True, False])
def test_aligned_groups_compute_the_unpadded_function_and_gradients(monkeypatch, index, layout):
    """16-bit GEMMs on a CPU pad every expert's group to 64 rows (oneDNN compiles a kernel per GEMM shape), and may
    run each expert's first rows as equal blocks of one batched GEMM: none (groups), all (blocks) or the first 64
    (the 70-row group spills 6 rows into its own GEMM). Forced on in float32, each gives the unpadded outputs and
    gradients up to rounding: groups of 0, 1, 64 and 70 rows, and dropped rows past the last group, which read the
    spare zero row and write nothing."""
    torch.manual_seed(0)
    experts = GroupedExperts(8, 16, 24)
    experts.cpu_layout = layout
    counts = torch.tensor([5, 0, 70, 3, 64, 1, 0, 9])
    offs_E = torch.cumsum(counts, 0).to(torch.int32)
    rows = int(counts.sum()) + 7  # 7 dropped rows, parked after the groups
    source = torch.randn(50 if index else rows, 16)
    source[-1] = 0.0  # the dispatcher's spare zero row
    index_R = torch.randint(0, 49, (rows,)) if index else None
    if index:
        index_R[-7:] = 49
    scale_R = torch.rand(rows)
    grad_RD = torch.randn(rows, 16)
    grad_RD[int(offs_E[-1]) :] = 0.0  # the combine never reads dropped rows

    def outputs_and_gradients(align):
        monkeypatch.setattr(experts_module, "group_alignment", lambda device, dtype: align)
        experts.zero_grad()
        src, scale = source.clone().requires_grad_(), scale_R.clone().requires_grad_()
        y_RD = experts(src, offs_E, scale, index_R=index_R)
        (y_RD * grad_RD).sum().backward()
        kept = int(offs_E[-1])
        assert y_RD.shape == (rows, 16)
        return y_RD[:kept], src.grad[:49], scale.grad[:kept], experts.w_in_EGFD.grad, experts.w_out_EDF.grad

    for unpadded, padded in zip(outputs_and_gradients(1), outputs_and_gradients(64)):
        torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-6)


def test_bf16_groups_are_padded_on_the_cpu_only():
    assert group_alignment(torch.device("cpu"), torch.bfloat16) == 64
    assert group_alignment(torch.device("cpu"), torch.float32) == 1
    assert group_alignment(torch.device("cuda"), torch.bfloat16) == 1
    groups = AlignedGroups.of(torch.tensor([3, 3, 70], dtype=torch.int32), num_rows=72, align=64)
    assert groups.offs_E.tolist() == [64, 64, 192] and groups.num_rows == 72 + 3 * 63
    assert groups.position_R[:4].tolist() == [0, 1, 2, 64] and groups.position_R[-2:].tolist() == [192, 193]
    split = AlignedGroups.of(torch.tensor([3, 3, 70], dtype=torch.int32), num_rows=72, align=64, block=64)
    # Counts 3, 0 and 67, then 2 dropped rows: blocks of 64 rows for the three experts (rows 0-191), then expert 2's
    # last 3 rows as a group padded to 64 rows, then the dropped rows.
    assert split.offs_E.tolist() == [0, 0, 64] and split.block == 64
    assert split.position_R[:4].tolist() == [0, 1, 2, 128] and split.position_R[66].item() == 191
    assert split.position_R[67:].tolist() == [192, 193, 194, 256, 257]


def test_cpu_layout_batches_the_rows_that_fit_in_equal_blocks():
    """A batched GEMM over equal blocks computes E x block rows: worth it for the rows of every expert when the loads
    are even and the experts small (fine-grained), for the bulk when one expert takes far more than the others (its
    excess gets its own GEMM), for none when a single expert has all the rows."""

    def block(counts, hidden, d_model=128):
        experts = GroupedExperts(len(counts), d_model, hidden)
        offs_E = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
        return aligned_groups(offs_E, sum(counts), 64, experts.macs_per_row).block

    even = [250 + (e % 5) * 10 for e in range(64)]
    assert block(even, hidden=48) == 320  # every row in the batched GEMM
    assert block([40] * 63 + [1200], hidden=48) == 64  # the one large expert's rows past 64 in a GEMM of its own
    uneven = [700, 1300, 1000, 1000, 950, 1050, 1000, 1000]
    assert 0 < block(uneven * 8, hidden=48) < 1344
    assert block([0] * 7 + [4096], hidden=1024, d_model=512) == 0  # one expert: batching would only add rows
    assert block([0] * 8, hidden=48) == 0  # no rows kept: nothing to batch
