"""The experts' speed layer: the kernels `experts.py` computes its math with, none of which changes the function.

    scaled_swiglu        silu(gate) * up * scale, fused by hand (less activation memory, fewer passes)
    grouped_mm           torch._grouped_mm over rows grouped by expert (an opaque op of it under torch.compile)
    gather_grouped_mm    the first expert GEMM reading its rows from the tokens, without keeping the gathered copy
    split_grouped_mm     the grouped GEMM with each expert's first `block` rows as one batched GEMM
    on_aligned_groups    16-bit expert GEMMs on a CPU: rows padded per expert, with a batched part chosen by a cost
                         model (`block_rows`)
    sum_token_rows       under torch.compile, each token's rows summed by a gather (TokenRows), not a scatter-add

Why each exists and what it gained, measured: `benchmarks/2026-12-05_cpu-2threads-blocks/README.md` (the batched
part, the narrow gate, the tail-free buffers and the cost model's constants),
`benchmarks/2026-12-04_cpu-2threads-peers/README.md` (the SwiGLU backward, eager and compiled) and
`benchmarks/2026-12-03_cpu-2threads-fast-path/README.md` (the padding to 64 rows),
`benchmarks/2026-12-07_cpu-avx512bf16/README.md` (the sums by gather under torch.compile).

Shape legend (as in experts.py):
    R  rows: token slots sorted by expert;  Q  source rows the R rows are gathered from;  P  padded rows
    E  experts;  F  one expert's hidden width;  G  2 for a gated activation;  I, O  a GEMM's input and output width
    T  tokens;  K  slots per token;  N = K x T  token choice's slots, k-major (slot k * T + t is token t's k-th)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------------------
# SwiGLU, fused

# Below this width the gate half of an (R, 2F) tensor is copied before silu, on a CPU: on short strided rows aten's
# vectorised loops run 2-7x slower per element (measured: the blocks benchmark's README). A GPU's elementwise kernels
# have neither cost, so there the copies would be launches for nothing.
NARROW_GATE_WIDTH = 128
# Buffers of a multiple of this many elements leave no element to the scalar tail of aten's vectorised loops (whose
# exp rounds differently) on one or two threads, so a row's bits do not depend on how many rows its call has: expert
# parallelism's per-rank parts compute the same numbers as the whole.
TAIL_FREE_ELEMENTS = 128


class ScaledSwiGLU(torch.autograd.Function):
    """silu(gate) * up * scale_R for h = [gate | up] (R, 2F): only h (and the scale) is saved for backward, which
    recomputes the sigmoid, instead of autograd keeping silu(gate), up and the product."""

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
        if is_narrow_on_cpu(gate):
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
            return swiglu_backward_for_inductor(h_RGF, scale_R, grad_RF, ctx.needs_input_grad[1])
        gate, up = h_RGF.chunk(2, dim=-1)
        narrow = is_narrow_on_cpu(gate)
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
        # Both halves written in place into one (R, 2F) gradient (no cat of two (R, F) halves), the gate's by aten's
        # fused silu backward.
        grad_RGF = torch.empty_like(h_RGF)
        width = gate.shape[-1]
        torch.ops.aten.silu_backward(grad_up_silu, gate, grad_input=grad_RGF[:, :width])
        torch.mul(grad_RF, silu, out=grad_RGF[:, width:])
        return grad_RGF, grad_scale


def is_narrow_on_cpu(gate_RF: torch.Tensor) -> bool:
    """Whether silu goes through a contiguous copy of the gate (NARROW_GATE_WIDTH, TAIL_FREE_ELEMENTS)."""
    return gate_RF.shape[-1] < NARROW_GATE_WIDTH and gate_RF.device.type == "cpu"


def scaled_swiglu(h_RGF: torch.Tensor, scale_R: Optional[torch.Tensor]) -> torch.Tensor:
    """(R, 2F) -> silu(gate) * up, each row times scale_R if given -> (R, F)."""
    return ScaledSwiGLU.apply(h_RGF, scale_R)


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


def swiglu_backward_for_inductor(
    h_RGF: torch.Tensor, scale_R: Optional[torch.Tensor], grad_RF: torch.Tensor, scale_grad: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """ScaledSwiGLU's backward as plain elementwise operations and a cat, which inductor fuses into one kernel
    (writes into slices of an empty tensor, eager's faster form, keep it from fusing)."""
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


# ------------------------------------------------------------------------------------------------------------
# Sums over each token's rows, as gathers


@dataclass(frozen=True)
class TokenRows:
    """Where each token's rows are, for token choice (every token has K slots, k-major): token t's k-th slot is row
    row_N[k * T + t], or no row where kept_N is False (a dropped slot, or one of no expert, whose row reads a spare
    zero row). It is the inverse of the rows' token index, and turns a sum over each token's rows (the combine, and
    the gradient of the gather into the experts) from a scatter-add into a gather and a sum over K, which inductor
    fuses into one loop where it falls back to aten's scatter-add for an index-add (measured on a CPU: the e64_fine
    step 1.056x faster, the default's 1.025x; the AVX512-BF16 benchmark's README). Eager keeps the index-add, which
    is faster than an eager gather and sum."""

    row_N: torch.Tensor  # int64 (N,)
    kept_N: Optional[torch.Tensor]  # bool (N,); None: every slot has its row
    num_tokens: int  # T

    def moved(self, position_R: torch.Tensor) -> "TokenRows":
        """The same slots after row r moved to position_R[r] (AlignedGroups' padded layout)."""
        return TokenRows(position_R.index_select(0, self.row_N), self.kept_N, self.num_tokens)


def sum_token_rows(v_RD: torch.Tensor, token_rows: TokenRows) -> torch.Tensor:
    """(R, D) rows -> (T, D): each token's rows summed (its slots without a row add nothing). Not differentiable by
    itself: the autograd functions that use it give its backward (a gather by the rows' token index)."""
    T = token_rows.num_tokens
    v_ND = v_RD.index_select(0, token_rows.row_N)
    if token_rows.kept_N is not None:  # where, not a product: rows past the last group are undefined
        v_ND = torch.where(token_rows.kept_N[:, None], v_ND, 0)
    return v_ND.view(-1, T, v_RD.shape[1]).sum(0)


class _SelectDistinctRows(torch.autograd.Function):
    """v_PD.index_select(0, position_R) for distinct positions: the backward writes each row's gradient in place
    (index_copy) where autograd's adds it (index_add, a scatter-add under inductor)."""

    @staticmethod
    def forward(ctx, v_PD: torch.Tensor, position_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(position_R)
        ctx.num_rows = v_PD.shape[0]
        return v_PD.index_select(0, position_R)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        (position_R,) = ctx.saved_tensors
        return grad_RD.new_zeros(ctx.num_rows, grad_RD.shape[1]).index_copy(0, position_R, grad_RD), None


def select_distinct_rows(v_PD: torch.Tensor, position_R: torch.Tensor) -> torch.Tensor:
    """Rows position_R of v_PD -> (R, D), the positions distinct; under torch.compile with a backward that writes
    rather than adds (eager's index_add is the faster of the two in eager)."""
    if torch.compiler.is_compiling():
        return _SelectDistinctRows.apply(v_PD, position_R)
    return v_PD.index_select(0, position_R)


# ------------------------------------------------------------------------------------------------------------
# Grouped GEMMs


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
    return _GatherGroupedMM.apply(x_PI, None, w_EOI, offs_E, block, None, None, 0)


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
    the rows again in backward: one copy of R x I numbers instead of R x I of activation memory. With token_rows
    (source rows [0, T) are the tokens, the rows past them spare rows whose gradient is discarded), the source's
    gradient is summed by gather (`sum_token_rows`) and the spare rows get zero."""

    @staticmethod
    def forward(
        ctx,
        src_QI: torch.Tensor,
        index_R: Optional[torch.Tensor],
        w_EOI: torch.Tensor,
        offs_E: torch.Tensor,
        block: int,
        row_N: Optional[torch.Tensor],  # token_rows' tensors as arguments of their own (dynamo traces these)
        kept_N: Optional[torch.Tensor],
        num_tokens: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(src_QI, index_R, w_EOI, offs_E, row_N, kept_N)
        ctx.block, ctx.num_tokens = block, num_tokens
        x_RI = src_QI if index_R is None else src_QI.index_select(0, index_R)
        return _split_mm(x_RI, w_EOI.transpose(-2, -1), offs_E, block)

    @staticmethod
    def backward(ctx, grad_RO: torch.Tensor):
        src_QI, index_R, w_EOI, offs_E, row_N, kept_N = ctx.saved_tensors
        token_rows = TokenRows(row_N, kept_N, ctx.num_tokens) if row_N is not None else None
        grad_RO = grad_RO.contiguous()
        grad_src = grad_w = None
        if ctx.needs_input_grad[0]:
            # (R, O) x (E, O, I) per group -> (R, I); rows past offs[-1] are undefined, and belong to dropped slots,
            # which the dispatcher points at a spare zero row of the source whose gradient is discarded.
            grad_RI = _split_mm(grad_RO, w_EOI, offs_E, ctx.block)
            grad_src = _source_gradient(grad_RI, src_QI, index_R, token_rows)
        if ctx.needs_input_grad[2]:
            x_RI = src_QI if index_R is None else src_QI.index_select(0, index_R)
            grad_w = _split_weight_grad(grad_RO, x_RI, offs_E, ctx.block)
        return grad_src, None, grad_w, None, None, None, None, None


def _source_gradient(
    grad_RI: torch.Tensor, src_QI: torch.Tensor, index_R: Optional[torch.Tensor], token_rows: Optional[TokenRows]
) -> torch.Tensor:
    """The gradient of src_QI[index_R] -> (Q, I): each source row's rows summed."""
    if index_R is None:
        return grad_RI
    if token_rows is None:
        return torch.zeros_like(src_QI).index_add_(0, index_R, grad_RI)
    grad_TI = sum_token_rows(grad_RI, token_rows)
    return torch.cat([grad_TI, grad_TI.new_zeros(src_QI.shape[0] - token_rows.num_tokens, grad_TI.shape[1])])


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
    src_QI: torch.Tensor,
    index_R: torch.Tensor,
    w_EOI: torch.Tensor,
    offs_E: torch.Tensor,
    block: int = 0,
    token_rows: Optional[TokenRows] = None,
) -> torch.Tensor:
    """Rows src_QI[index_R], grouped by expert, times w_EOI[e]^T -> (R, O), keeping only src and index for
    backward (see _GatherGroupedMM); with `block`, the rows are laid out as `split_grouped_mm` reads them; with
    token_rows (index_R's inverse for src's first T rows), the source's gradient is summed by gather."""
    if token_rows is None:
        return _GatherGroupedMM.apply(src_QI, index_R, w_EOI, offs_E, block, None, None, 0)
    by = token_rows
    return _GatherGroupedMM.apply(src_QI, index_R, w_EOI, offs_E, block, by.row_N, by.kept_N, by.num_tokens)


# ------------------------------------------------------------------------------------------------------------
# Padded groups and the batched part (16-bit GEMMs on a CPU)


def round_up(rows, multiple: int):
    """rows (an int or an integer tensor) rounded up to a multiple of `multiple`."""
    return (rows + multiple - 1) // multiple * multiple


def group_alignment(device: torch.device, dtype: torch.dtype) -> int:
    """Rows each expert's group is padded to a multiple of before the grouped GEMM: 64 for 16-bit GEMMs on a CPU,
    else 1 (no padding). oneDNN JIT-compiles a kernel for every new 16-bit GEMM shape, and a run's row counts change
    every step; padded, they fall into a few dozen shapes whose kernels stay cached (measured: the fast-path
    benchmark's README). Float32 GEMMs need no kernel per shape. (torchtitan pads groups for the CUDA grouped GEMM's
    alignment in the same way.)"""
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


# The cost model of the batched part, in rows of the per-expert GEMMs (fitted on a 2-core CPU with AMX; the fit and
# the layouts it chooses between: `benchmarks/2026-12-05_cpu-2threads-blocks/README.md`):
#     block = 0:  (the rows, each group padded) + E x GROUP_GEMM_OVERHEAD_MACS / (MACs per row)
#     block > 0:  BLOCK_ROW_COST x E x block + (for each expert with rows past the block: those rows, padded, plus
#                 SPLIT_GROUP_ROWS)
BLOCK_ROW_COST = 0.84
GROUP_GEMM_OVERHEAD_MACS = 2.5e6
SPLIT_GROUP_ROWS = 300


def block_rows(counts_E: torch.Tensor, align: int, macs_per_row: int, layout: str | int = "auto") -> int:
    """The rows per expert of the batched part (a multiple of `align`; 0: none) that minimise the cost model above;
    `layout` "blocks" takes the largest group, an int that many rows, "groups" none."""
    largest = round_up(int(counts_E.max()), align)
    if layout == "groups":
        return 0
    if layout == "blocks" or isinstance(layout, int):
        return largest if layout == "blocks" else int(layout)
    blocks_B = torch.arange(0, largest + 1, align)
    rest_BE = (counts_E[None, :] - blocks_B[:, None]).clamp(min=0)
    padded_rest_B = round_up(rest_BE, align).sum(1)
    num_experts = len(counts_E)
    cost_B = BLOCK_ROW_COST * num_experts * blocks_B + padded_rest_B + (rest_BE > 0).sum(1) * SPLIT_GROUP_ROWS
    cost_B[0] = padded_rest_B[0] + num_experts * GROUP_GEMM_OVERHEAD_MACS / macs_per_row  # no batched part
    return int(blocks_B[torch.argmin(cost_B)])


def aligned_groups(
    offs_E: torch.Tensor, num_rows: int, align: int, macs_per_row: int, layout: str | int = "auto"
) -> AlignedGroups:
    """Per-expert groups padded to `align` rows, with a batched part of `block_rows` rows per expert. Choosing reads
    the row counts on the host: free on a CPU, the only place this runs (not under torch.compile, which keeps the
    host-free groups)."""
    if layout == "groups" or torch.compiler.is_compiling():
        return AlignedGroups.of(offs_E, num_rows, align)
    counts_E = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1, dtype=torch.long)).cpu()
    block = block_rows(counts_E, align, macs_per_row, layout)
    if block == 0:
        return AlignedGroups.of(offs_E, num_rows, align)
    rest_E = (counts_E - block).clamp(min=0)
    grouped_rows = int(round_up(rest_E, align).sum())
    dropped_rows = num_rows - int(counts_E.sum())
    padded_rows = len(counts_E) * block + grouped_rows + dropped_rows
    return AlignedGroups.of(offs_E, num_rows, align, block, padded_rows)


# f(source_QD, offs_E, scale_R, index_R, block, token_rows) -> (R, D): the experts on rows laid out for
# split_grouped_mm.
ExpertsOnGroups = Callable[
    [torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], int, Optional[TokenRows]],
    torch.Tensor,
]


def on_aligned_groups(
    experts: ExpertsOnGroups,
    x_RD: torch.Tensor,
    offs_E: torch.Tensor,
    scale_R: Optional[torch.Tensor],
    index_R: Optional[torch.Tensor],
    align: int,
    macs_per_row: int,
    layout: str | int = "auto",
    token_rows: Optional[TokenRows] = None,
) -> torch.Tensor:
    """`experts` on the rows padded into AlignedGroups, then the real rows picked back out -> (R, D): the same
    function as `experts(x_RD, offs_E, scale_R, index_R, 0, token_rows)`, with GEMM shapes that oneDNN's kernel
    cache keeps."""
    groups = aligned_groups(
        offs_E, index_R.shape[0] if index_R is not None else x_RD.shape[0], align, macs_per_row, layout
    )
    # Padding rows read an appended zero row, whose gradient (undefined past the last group) is cut off.
    source_QD = torch.cat([x_RD, x_RD.new_zeros(1, x_RD.shape[1])])
    index_P = groups.padded_index(index_R, spare=x_RD.shape[0])
    padded_token_rows = token_rows.moved(groups.position_R) if token_rows is not None else None
    y_PD = experts(source_QD, groups.offs_E, groups.padded(scale_R), index_P, groups.block, padded_token_rows)
    return select_distinct_rows(y_PD, groups.position_R)
