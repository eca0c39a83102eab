"""Feed-forward networks: the dense FFN and the bank of routed experts.

Shape legend:
    R  rows: token slots sorted by expert (the grouped GEMM's ragged dimension)
    Q  source rows the R rows are gathered from (see dispatch.py)
    D  d_model
    E  routed experts
    F  one expert's hidden width
    G  1 for plain activations, 2 for gated ones (gate and up projections fused into one matrix)
    I, O  the input and output width of one grouped GEMM (D and G*F for the first, F and D for the second)

Expert weights are stored as (E, out, in), so `w.transpose(-2, -1)` is the column-major right operand that
`torch._grouped_mm` reads without a copy (torchtitan PR 1510), and the gate and up projections of a gated
activation are one (E, 2F, D) matrix: one grouped GEMM instead of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (activation, gated). Gated ones compute act(x W_gate) * (x W_up) (Shazeer 2020, "GLU Variants").
ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "geglu": (lambda x: F.gelu(x, approximate="tanh"), True),
    "gelu": (lambda x: F.gelu(x, approximate="tanh"), False),
    "relu": (F.relu, False),
}


class _ScaledSwiGLU(torch.autograd.Function):
    """silu(gate) * up * scale_R for h = [gate | up] (R, 2F), fused by hand: only h (and the scale) is saved for
    backward, which recomputes the sigmoid, instead of autograd keeping silu(gate), up and the product: less
    activation memory and fewer passes over (R, F) buffers."""

    @staticmethod
    def forward(ctx, h_RGF: torch.Tensor, scale_R: Optional[torch.Tensor]) -> torch.Tensor:
        gate, up = h_RGF.chunk(2, dim=-1)
        ctx.save_for_backward(h_RGF, scale_R)
        if torch.compiler.is_compiling():
            # No in-place operation on the returned tensor under torch.compile: torch 2.11's dynamo sends the
            # backward's gradient to the wrong output of such a forward, silently (pytorch#180642, fixed in 2.12).
            # Inductor fuses the out-of-place form into one kernel anyway.
            out = F.silu(gate) * up
            return out if scale_R is None else out * scale_R[:, None]
        if gate.shape[-1] < NARROW_GATE_WIDTH:
            out = torch.mul(_narrow_silu(gate)[1], up)
        else:
            out = F.silu(gate).mul_(up)
        if scale_R is not None:
            out.mul_(scale_R[:, None])
        return out

    @staticmethod
    def backward(ctx, grad_RF: torch.Tensor):
        h_RGF, scale_R = ctx.saved_tensors
        if torch.compiler.is_compiling():
            return _swiglu_backward_for_inductor(h_RGF, scale_R, grad_RF, ctx.needs_input_grad[1])
        gate, up = h_RGF.chunk(2, dim=-1)
        narrow = gate.shape[-1] < NARROW_GATE_WIDTH
        if narrow:
            gate_flat, silu = _narrow_silu(gate)
            grad_flat, grad_up_silu = _tail_free_buffer(gate)
            torch.mul(grad_RF, up, out=grad_up_silu)  # the gradient reaching silu(gate), before the scale
        else:
            silu = F.silu(gate)
            grad_up_silu = grad_RF * up
        grad_scale = None
        if scale_R is not None:
            if ctx.needs_input_grad[1]:
                grad_scale = (grad_up_silu * silu).sum(-1)
            grad_up_silu.mul_(scale_R[:, None])
            grad_RF = grad_RF * scale_R[:, None]
        if narrow:  # unary kernels on contiguous halves, then one cat
            grad_gate = torch.ops.aten.silu_backward(grad_flat, gate_flat)[: gate.numel()].view(gate.shape)
            return torch.cat([grad_gate, grad_RF * silu], dim=-1), grad_scale
        # Both halves written in place into one (R, 2F) gradient (no torch.cat of two (R, F) halves), the gate's by
        # aten's fused silu backward: 1.6x faster than the same formula in separate operations at (8192, 2048).
        grad_RGF = torch.empty_like(h_RGF)
        width = gate.shape[-1]
        torch.ops.aten.silu_backward(grad_up_silu, gate, grad_input=grad_RGF[:, :width])
        torch.mul(grad_RF, silu, out=grad_RGF[:, width:])
        return grad_RGF, grad_scale


# Below this width, silu and its backward on the gate half of an (R, 2F) tensor (rows strided by 2F) run 2-7x slower
# per element than on a contiguous copy (aten's vectorised loops handle short strided rows poorly: at F = 48 in
# bfloat16, 1.6 ms against 0.22 + 0.13 ms for the copy at 18432 rows); copying is worth it up to about F = 128.
NARROW_GATE_WIDTH = 128
# aten's vectorised elementwise loops take two vectors (at most 64 elements) at a time and finish a tensor with the
# scalar function, whose exp rounds differently. Over a buffer whose length is a multiple of this, on one or two
# threads, no element is left to that tail, so each element's bits do not depend on how many rows a call has: the
# experts compute the same numbers however their rows are split over calls (expert parallelism's per-rank parts).
TAIL_FREE_ELEMENTS = 128


def _tail_free_buffer(like_RF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a flat buffer of a multiple of TAIL_FREE_ELEMENTS, zero past R x F; its first R x F elements as (R, F))."""
    numel = like_RF.numel()
    flat = like_RF.new_empty(round_up(numel, TAIL_FREE_ELEMENTS))
    flat[numel:].zero_()
    return flat, flat[:numel].view(like_RF.shape)


def _narrow_silu(gate_RF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gate copied into a tail-free buffer, silu of it as a contiguous (R, F) view)."""
    gate_flat, gate_view = _tail_free_buffer(gate_RF)
    gate_view.copy_(gate_RF)
    return gate_flat, F.silu(gate_flat)[: gate_RF.numel()].view(gate_RF.shape)


def _swiglu_backward_for_inductor(
    h_RGF: torch.Tensor, scale_R: Optional[torch.Tensor], grad_RF: torch.Tensor, scale_grad: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """_ScaledSwiGLU's backward as plain elementwise operations and a cat, which inductor fuses into one kernel
    (writes into slices of an empty tensor, eager's faster form, keep it from fusing: 1.2x slower compiled steps)."""
    gate, up = h_RGF.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_scale = None
    if scale_R is not None:
        if scale_grad:
            grad_scale = (grad_RF * up * silu).sum(-1)
        grad_RF = grad_RF * scale_R[:, None]
    # d silu(g) / d g = sig * (1 + g * (1 - sig)) = sig * (1 + g - silu)
    grad_gate = grad_RF * up * sig * (gate - silu + 1.0)
    return torch.cat([grad_gate, grad_RF * silu], dim=-1), grad_scale


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """(.., G*F) pre-activations -> (.., F) hidden activations."""
    act, gated = ACTIVATIONS[activation]
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


class FeedForward(nn.Module):
    """A dense FFN: the FFN of dense layers, and the shared experts of an MoE layer (DeepSeekMoE)."""

    def __init__(
        self, d_model: int, hidden: int, activation: str = "swiglu", init_std: float = 0.02, out_std: float = 0.02
    ):
        super().__init__()
        self.activation = activation
        gated = ACTIVATIONS[activation][1]
        self.w_in = nn.Linear(d_model, (2 if gated else 1) * hidden, bias=False)  # gate and up fused
        self.w_out = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=init_std)
        nn.init.normal_(self.w_out.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(apply_activation(self.w_in(x), self.activation))


@torch.library.custom_op("moe_lab::grouped_mm", mutates_args=())
def _opaque_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@_opaque_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:  # (R, I) x (E, I, O) -> (R, O)
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])  # (O, R) x (R, I), groups along R -> (E, O, I)


def _opaque_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _opaque_backward(ctx, grad: torch.Tensor):
    a, b, offs = ctx.saved_tensors  # only the (R, I) x (E, I, O) form is differentiated (the other is a gradient)
    grad = grad.contiguous()
    grad_a = _opaque_grouped_mm(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = _opaque_grouped_mm(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_opaque_grouped_mm.register_autograd(_opaque_backward, setup_context=_opaque_setup)


def raw_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm; under torch.compile an opaque op of the same kernel, because the fake (meta) kernel of
    torch._grouped_mm accepts only bfloat16 while the CPU kernel runs float32 too (torch 2.13). Eager runs call
    torch._grouped_mm itself, so compiling changes nothing for them."""
    if torch.compiler.is_compiling():
        return _opaque_grouped_mm(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


def grouped_mm(x_RI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows x_RI[offs[e-1]:offs[e]] times w_EOI[e]^T, for every expert e, as one grouped GEMM -> (R, O).

    Rows past offs[-1] belong to no group; their output is undefined and callers mask it.
    """
    return raw_grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs_E)


def split_grouped_mm(x_PI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor, block: int) -> torch.Tensor:
    """The grouped GEMM over rows laid out as `AlignedGroups` does -> (P, O): rows [0, E * block) are E blocks of
    `block` rows, block e times w_EOI[e]^T as one batched GEMM; the rows after them are grouped by offs_E (group ends
    counted from row E * block), one GEMM per group. block = 0 is the plain grouped GEMM."""
    if block == 0:
        return grouped_mm(x_PI, w_EOI, offs_E)
    return _GatherGroupedMM.apply(x_PI, None, w_EOI, offs_E, block)


def _split_mm(x_PI: torch.Tensor, b_EIO: torch.Tensor, offs_E: torch.Tensor, block: int) -> torch.Tensor:
    """x_PI's rows times b_EIO[e] per block and per group (no autograd) -> (P, O); the batched GEMM writes into the
    output, so the two parts are not copied together."""
    if block == 0:
        return raw_grouped_mm(x_PI, b_EIO, offs_E)
    E, split = b_EIO.shape[0], b_EIO.shape[0] * block
    out_PO = x_PI.new_empty(x_PI.shape[0], b_EIO.shape[-1])
    torch.bmm(x_PI[:split].view(E, block, -1), b_EIO, out=out_PO[:split].view(E, block, -1))
    if x_PI.shape[0] > split:
        out_PO[split:] = raw_grouped_mm(x_PI[split:], b_EIO, offs_E)
    return out_PO


class _GatherGroupedMM(torch.autograd.Function):
    """split_grouped_mm(src_QI[index_R], w_EOI, offs_E, block) without keeping the gathered rows for backward
    (index_R None: the rows are src_QI).

    Autograd of gather-then-GEMM keeps the gathered (R, I) rows, top_k copies of every token, for the weight
    gradient; this keeps the source (Q rows, usually already kept by the router's GEMM) and the index, and gathers
    the rows again in backward: one copy of R x I numbers instead of R x I of activation memory."""

    @staticmethod
    def forward(
        ctx,
        src_QI: torch.Tensor,
        index_R: Optional[torch.Tensor],
        w_EOI: torch.Tensor,
        offs_E: torch.Tensor,
        block: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(src_QI, index_R, w_EOI, offs_E)
        ctx.block = block
        x_RI = src_QI if index_R is None else src_QI.index_select(0, index_R)
        return _split_mm(x_RI, w_EOI.transpose(-2, -1), offs_E, block)

    @staticmethod
    def backward(ctx, grad_RO: torch.Tensor):
        src_QI, index_R, w_EOI, offs_E = ctx.saved_tensors
        grad_RO = grad_RO.contiguous()
        grad_src = grad_w = None
        if ctx.needs_input_grad[0]:
            # (R, O) x (E, O, I) per group -> (R, I); rows past offs[-1] are undefined, and belong to dropped slots,
            # which the dispatcher points at a spare zero row of the source whose gradient is discarded.
            grad_RI = _split_mm(grad_RO, w_EOI, offs_E, ctx.block)
            grad_src = grad_RI if index_R is None else torch.zeros_like(src_QI).index_add_(0, index_R, grad_RI)
        if ctx.needs_input_grad[2]:
            x_RI = src_QI if index_R is None else src_QI.index_select(0, index_R)
            grad_w = _split_weight_grad(grad_RO, x_RI, offs_E, ctx.block)
        return grad_src, None, grad_w, None, None


def _split_weight_grad(grad_RO: torch.Tensor, x_RI: torch.Tensor, offs_E: torch.Tensor, block: int) -> torch.Tensor:
    """The gradient of split_grouped_mm's weight: (O, R) x (R, I), summed over each expert's block and group ->
    (E, O, I); rows past offs[-1] are outside every group."""
    if block == 0:
        return raw_grouped_mm(grad_RO.t(), x_RI, offs_E)
    E, split = offs_E.shape[0], offs_E.shape[0] * block
    grad_EOI = torch.bmm(grad_RO[:split].view(E, block, -1).transpose(1, 2), x_RI[:split].view(E, block, -1))
    if grad_RO.shape[0] == split:
        return grad_EOI
    return grad_EOI + raw_grouped_mm(grad_RO[split:].t(), x_RI[split:], offs_E)


def gather_grouped_mm(
    src_QI: torch.Tensor, index_R: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor, block: int = 0
) -> torch.Tensor:
    """Rows src_QI[index_R], grouped by expert, times w_EOI[e]^T -> (R, O), keeping only src and index for
    backward (see _GatherGroupedMM); with `block`, the rows are laid out as `split_grouped_mm` reads them."""
    return _GatherGroupedMM.apply(src_QI, index_R, w_EOI, offs_E, block)


def round_up(rows, multiple: int):
    """rows (an int or an integer tensor) rounded up to a multiple of `multiple`."""
    return (rows + multiple - 1) // multiple * multiple


def group_alignment(device: torch.device, dtype: torch.dtype) -> int:
    """Rows each expert's group is padded to a multiple of before the grouped GEMM: 64 for 16-bit GEMMs on a CPU,
    else 1 (no padding). On a CPU `torch._grouped_mm` runs one GEMM per expert, and oneDNN builds (JIT-compiles) a
    kernel for every new GEMM shape: about 1.3 ms for a 600 x 128 x 768 bfloat16 GEMM that then runs in 0.08 ms.
    The row counts of a training run change at every step, so without padding nearly every expert GEMM pays that
    cost; padded, the counts fall into a few dozen sizes whose kernels stay cached. Float32 GEMMs need no kernel
    per shape. (torchtitan pads groups for the CUDA grouped GEMM's alignment in the same way.)"""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return 64
    return 1


@dataclass(frozen=True)
class AlignedGroups:
    """Rows grouped by expert, moved to P rows laid out for `split_grouped_mm`:
      - rows [0, E * block): expert e's first `block` rows (or all, if fewer) at [e * block, (e + 1) * block), for
        one batched GEMM;
      - then each expert's remaining rows as a group that starts and ends at a multiple of `align`, one GEMM each;
      - then the rows past offs[-1] (dropped slots), in order.
    With block = 0 every row is in the groups and P = R + E * (align - 1) is fixed by the shapes alone (no host
    synchronisation: the layout under torch.compile); with block > 0 the caller has read the row counts on the host
    and gives the exact P. Padding rows read a zero row with weight 0 and their outputs are never read, so their
    gradients are zero and they add exact zeros to the weight gradients: the function is the unpadded one, up to the
    GEMMs' summation order.

    Legend: R rows in, P padded rows, E experts."""

    offs_E: torch.Tensor  # int32 (E,), the group ends of the grouped part, counted from its first row E * block
    position_R: torch.Tensor  # int64 (R,), where each row sits among the P padded rows
    num_rows: int  # P
    block: int = 0

    @staticmethod
    def of(
        offs_E: torch.Tensor, num_rows: int, align: int, block: int = 0, padded_rows: Optional[int] = None
    ) -> "AlignedGroups":
        E = offs_E.shape[0]
        ends_E = offs_E.long()
        counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
        rest_E = (counts_E - block).clamp(min=0)
        padded_ends_E = torch.cumsum(round_up(rest_E, align), 0)
        arange_R = torch.arange(num_rows, device=offs_E.device)
        expert_R = torch.searchsorted(ends_E, arange_R, right=True)  # E for the rows past offs[-1]
        zero = ends_E.new_zeros(1)
        rank_R = arange_R - torch.cat([zero, ends_E])[expert_R]  # place among its expert's rows (or the dropped)
        block_R = torch.cat([ends_E.new_full((E,), block), zero])[expert_R]
        in_block_R = rank_R < block_R
        grouped_R = E * block + torch.cat([zero, padded_ends_E])[expert_R] + rank_R - block_R
        position_R = torch.where(in_block_R, expert_R * block + rank_R, grouped_R)
        if padded_rows is None:
            padded_rows = num_rows + E * (align - 1)
        return AlignedGroups(padded_ends_E.to(torch.int32), position_R, padded_rows, block)

    def padded(self, values_R: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(R,) per-row values -> (P,), zero on the padding rows."""
        if values_R is None:
            return None
        return values_R.new_zeros(self.num_rows).index_copy(0, self.position_R, values_R)

    def padded_index(self, index_R: Optional[torch.Tensor], spare: int) -> torch.Tensor:
        """The source row of each padded row: index_R's (or row r itself) where a row sits, `spare` on padding."""
        if index_R is None:
            index_R = torch.arange(self.position_R.shape[0], device=self.position_R.device)
        return index_R.new_full((self.num_rows,), spare).index_copy(0, self.position_R, index_R)


# On a CPU, `split_grouped_mm` runs the first `block` rows of every expert as one batched GEMM and the rest as one
# GEMM per expert; `GroupedExperts` picks the block (0 to the largest group) of least modelled cost, in rows of the
# per-expert GEMMs:
#     block = 0:  (the rows, each group padded) + E x GROUP_GEMM_OVERHEAD_MACS / (MACs per row)
#     block > 0:  BLOCK_ROW_COST x E x block + (for each expert with rows past the block: those rows, padded, plus
#                 SPLIT_GROUP_ROWS)
# A row of the batched GEMM costs about 0.84 of a grouped one, and the per-expert GEMMs cost a fixed overhead worth
# about 2.5M multiply-adds more than the batched GEMM's (fitted where all-blocks and all-groups cross over at three
# shapes: 64 experts of width 48 at d_model 128, 8 of width 384, 64 of width 256 at d_model 512; bfloat16 forward +
# backward, 2 threads with AMX). An expert's extra GEMMs for its rows past the block cost about 300 rows whatever
# the shape (the extra calls of a split: below what makes 8 wide experts split, above what keeps 64 narrow ones from
# it). `benchmarks/2026-12-05_cpu-2threads-blocks/` measures the layouts and the choice.
BLOCK_ROW_COST = 0.84
GROUP_GEMM_OVERHEAD_MACS = 2.5e6
SPLIT_GROUP_ROWS = 300


class GroupedExperts(nn.Module):
    """E expert FFNs with weights stacked on a leading expert dimension."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        hidden: int,
        activation: str = "swiglu",
        init_std: float = 0.02,
        out_std: float = 0.02,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not known; choose one of {sorted(ACTIVATIONS)}")
        self.num_experts = num_experts  # experts held here (a slice of them under expert parallelism)
        self.total_experts = num_experts
        self.first_expert = 0
        self.hidden = hidden
        self.activation = activation
        # How 16-bit expert GEMMs on a CPU lay out their rows (AlignedGroups): "auto" picks the batched part's rows
        # per call (see BLOCK_ROW_COST); "groups" (no batched part), "blocks" (all rows batched) or a number of rows
        # force one (tests, benches).
        self.cpu_layout = "auto"
        gated = ACTIVATIONS[activation][1]
        self.w_in_EGFD = nn.Parameter(torch.empty(num_experts, (2 if gated else 1) * hidden, d_model))
        self.w_out_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        nn.init.normal_(self.w_in_EGFD, std=init_std)
        nn.init.normal_(self.w_out_EDF, std=out_std)

    def keep_experts(self, first: int, count: int) -> None:
        """Expert parallelism: keep experts [first, first + count) of the bank; the others live on other ranks.
        `first_expert` and `total_experts` say which slice this is (checkpoints always hold every expert)."""
        self.w_in_EGFD = nn.Parameter(self.w_in_EGFD.data[first : first + count].clone())
        self.w_out_EDF = nn.Parameter(self.w_out_EDF.data[first : first + count].clone())
        self.first_expert, self.num_experts = first, count

    @property
    def is_sharded(self) -> bool:
        return self.num_experts != self.total_experts

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # torch._grouped_mm is not on autocast's cast list: follow autocast by hand, so bf16 runs use bf16 GEMMs.
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def forward(
        self,
        x_RD: torch.Tensor,
        offs_E: torch.Tensor,
        scale_R: Optional[torch.Tensor] = None,
        index_R: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Sorted rows (R, D) and int32 cumulative row counts per expert (E,) -> expert outputs (R, D), each row
        multiplied by scale_R (the routing weights) if given: applied to the hidden activations when those are
        narrower than the output (fine-grained experts), else to the output, whichever touches fewer numbers.

        With index_R, x_RD is the source (Q, D) of the rows and row r is x_RD[index_R[r]]: gathered inside the
        first GEMM, so the R gathered rows are not kept for backward."""
        align = group_alignment(x_RD.device, self._compute_dtype(x_RD))
        if align == 1 or x_RD.shape[0] == 0:
            return self._grouped_forward(x_RD, offs_E, scale_R, index_R)
        groups = self._aligned_groups(offs_E, index_R.shape[0] if index_R is not None else x_RD.shape[0], align)
        # Padding rows read an appended zero row, whose gradient (undefined past the last group) is cut off.
        source_QD = torch.cat([x_RD, x_RD.new_zeros(1, x_RD.shape[1])])
        index_P = groups.padded_index(index_R, spare=x_RD.shape[0])
        y_PD = self._grouped_forward(source_QD, groups.offs_E, groups.padded(scale_R), index_P, groups.block)
        return y_PD.index_select(0, groups.position_R)

    def _aligned_groups(self, offs_E: torch.Tensor, num_rows: int, align: int) -> AlignedGroups:
        """Per-expert groups padded to `align` rows, with a batched part of `block` rows per expert when the cost
        model says so. Choosing reads the row counts on the host: free on a CPU, the only place this runs (not under
        torch.compile, which keeps the host-free groups)."""
        if self.cpu_layout == "groups" or torch.compiler.is_compiling():
            return AlignedGroups.of(offs_E, num_rows, align)
        counts_E = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1, dtype=torch.long)).cpu()
        block = self._block_rows(counts_E, align)
        if block == 0:
            return AlignedGroups.of(offs_E, num_rows, align)
        rest_E = (counts_E - block).clamp(min=0)
        grouped_rows = int(round_up(rest_E, align).sum())
        dropped_rows = num_rows - int(counts_E.sum())
        padded_rows = len(counts_E) * block + grouped_rows + dropped_rows
        return AlignedGroups.of(offs_E, num_rows, align, block, padded_rows)

    def _block_rows(self, counts_E: torch.Tensor, align: int) -> int:
        """The rows per expert of the batched part (a multiple of `align`; 0: none) that minimise the cost model
        above BLOCK_ROW_COST; `cpu_layout` "blocks" takes the largest group, an int that many rows."""
        largest = round_up(int(counts_E.max()), align)
        if self.cpu_layout == "blocks" or isinstance(self.cpu_layout, int):
            return largest if self.cpu_layout == "blocks" else self.cpu_layout
        gated = ACTIVATIONS[self.activation][1]
        macs_per_row = self.w_in_EGFD.shape[-1] * self.hidden * (3 if gated else 2)
        blocks_B = torch.arange(0, largest + 1, align)
        rest_BE = (counts_E[None, :] - blocks_B[:, None]).clamp(min=0)
        padded_rest_B = round_up(rest_BE, align).sum(1)
        num_experts = len(counts_E)
        cost_B = BLOCK_ROW_COST * num_experts * blocks_B + padded_rest_B + (rest_BE > 0).sum(1) * SPLIT_GROUP_ROWS
        cost_B[0] = padded_rest_B[0] + num_experts * GROUP_GEMM_OVERHEAD_MACS / macs_per_row  # no batched part
        return int(blocks_B[torch.argmin(cost_B)])

    def _grouped_forward(
        self,
        x_RD: torch.Tensor,
        offs_E: torch.Tensor,
        scale_R: Optional[torch.Tensor],
        index_R: Optional[torch.Tensor],
        block: int = 0,
    ) -> torch.Tensor:
        """The experts on rows grouped by expert, laid out as `split_grouped_mm` reads them (block > 0 needs
        index_R)."""
        dtype = self._compute_dtype(x_RD)
        if index_R is None:
            h_RGF = grouped_mm(x_RD.to(dtype), self.w_in_EGFD.to(dtype), offs_E)
        else:
            h_RGF = gather_grouped_mm(x_RD.to(dtype), index_R, self.w_in_EGFD.to(dtype), offs_E, block)
        scale_R = scale_R.to(dtype) if scale_R is not None else None
        scale_hidden = scale_R is not None and self.hidden <= x_RD.shape[1]
        if self.activation == "swiglu":
            a_RF = _ScaledSwiGLU.apply(h_RGF, scale_R if scale_hidden else None)
        else:
            a_RF = apply_activation(h_RGF, self.activation)
            if scale_hidden:
                a_RF = a_RF * scale_R[:, None]
        y_RD = split_grouped_mm(a_RF, self.w_out_EDF.to(dtype), offs_E, block)
        return y_RD * scale_R[:, None] if scale_R is not None and not scale_hidden else y_RD

    def expert_forward(self, expert: int, x_RD: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows, with plain matmuls: the building block of the reference loop."""
        dtype = self._compute_dtype(x_RD)
        h = x_RD.to(dtype) @ self.w_in_EGFD[expert].to(dtype).t()
        return apply_activation(h, self.activation) @ self.w_out_EDF[expert].to(dtype).t()


def residual_out_std(init_std: float, n_layers: int) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return init_std / math.sqrt(2 * n_layers)
