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

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.model.config import GATED_ACTIVATIONS
from moe_lab.model.expert_kernels import (
    TokenRows,
    gather_grouped_mm,
    group_alignment,
    grouped_mm,
    on_aligned_groups,
    scaled_swiglu,
    split_grouped_mm,
)
from moe_lab.model.seeding import part_seed

# name -> (activation, gated), for the names the settings know (config.GATED_ACTIVATIONS). Gated ones compute
# act(x W_gate) * (x W_up) (Shazeer 2020, "GLU Variants").
_FUNCTIONS = {
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swiglu_clamped": F.silu,  # the gate's function; clamped_swiglu below is the whole activation
}
ACTIVATIONS = {name: (_FUNCTIONS[name], gated) for name, gated in GATED_ACTIVATIONS.items()}

# gpt-oss's SwiGLU (OpenAI 2025): gate * sigmoid(alpha * gate) with the gate clamped above at `limit` and the up
# projection clamped to [-limit, limit] and shifted by 1, which keeps an expert's output bounded.
CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT = 1.702, 7.0


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate = gate.clamp(max=CLAMPED_SWIGLU_LIMIT)
    up = up.clamp(min=-CLAMPED_SWIGLU_LIMIT, max=CLAMPED_SWIGLU_LIMIT)
    return gate * torch.sigmoid(CLAMPED_SWIGLU_ALPHA * gate) * (up + 1)


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """(.., G*F) pre-activations -> (.., F) hidden activations."""
    act, gated = ACTIVATIONS[activation]
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return clamped_swiglu(gate, up) if activation == "swiglu_clamped" else act(gate) * up
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


_ON_META = False  # set inside `experts_on_meta`


@contextlib.contextmanager
def experts_on_meta() -> Iterator[None]:
    """Inside, expert banks are built on the meta device: they have shapes but no memory until `keep_experts`
    materialises a slice, so that a rank under expert parallelism never holds the experts it does not own."""
    global _ON_META
    before, _ON_META = _ON_META, True
    try:
        yield
    finally:
        _ON_META = before


class GroupedExperts(nn.Module):
    """E expert FFNs with weights stacked on a leading expert dimension.

    Each expert's initial weights come from a random stream of its own, seeded by (the seed of the part that built
    the bank, the expert's number): a bank materialised in slices (one per expert-parallel rank) holds exactly the
    weights of the whole bank built in one process, and a bank of 16 experts starts with the same first 8 as one of
    8 (paired comparisons)."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        hidden: int,
        activation: str = "swiglu",
        init_std: float = 0.02,
        out_std: float = 0.02,
        bias: bool = False,
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
        # per call (expert_kernels.block_rows); "groups" (no batched part), "blocks" (all rows batched) or a number
        # of rows force one (tests, benches).
        self.cpu_layout = "auto"
        gated = ACTIVATIONS[activation][1]
        self.init_seed = torch.initial_seed()  # the seed of the part in force (seeding.py): each expert's derives
        self.init_std, self.out_std = init_std, out_std
        meta = torch.device("meta")
        self.w_in_EGFD = nn.Parameter(torch.empty(num_experts, (2 if gated else 1) * hidden, d_model, device=meta))
        self.w_out_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden, device=meta))
        # Per-expert biases of both projections (gpt-oss), zero at init; None = none (every other family).
        self.b_in_EGF: Optional[nn.Parameter] = None
        self.b_out_ED: Optional[nn.Parameter] = None
        if bias:
            self.b_in_EGF = nn.Parameter(torch.empty(num_experts, self.w_in_EGFD.shape[1], device=meta))
            self.b_out_ED = nn.Parameter(torch.empty(num_experts, d_model, device=meta))
        if not _ON_META:
            self.materialise(0, num_experts)

    def materialise(self, first: int, count: int) -> None:
        """Give experts [first, first + count) their initial weights, each from its own stream; the bank then holds
        those experts only (the whole bank: first 0, count E)."""
        device = torch.get_default_device()
        for name in self.expert_weights:
            old = getattr(self, name)  # frozen (fine-tuning) stays frozen
            shape = (count, *old.shape[1:])
            setattr(self, name, nn.Parameter(torch.zeros(shape, device=device), old.requires_grad))  # biases stay 0
        for i in range(count):
            g = torch.Generator().manual_seed(part_seed(self.init_seed, f"expert{first + i}"))  # a CPU stream
            with torch.no_grad():
                for name, std in (("w_in_EGFD", self.init_std), ("w_out_EDF", self.out_std)):
                    row = getattr(self, name)[i]
                    if row.device.type == "cpu":
                        row.normal_(0.0, std, generator=g)  # in place: no copy of the rank's share
                    else:
                        row.copy_(torch.empty(row.shape).normal_(0.0, std, generator=g))
        self.first_expert, self.num_experts = first, count

    @property
    def expert_weights(self) -> list[str]:
        """The names of the parameters with one slice per expert (what expert parallelism splits)."""
        names = ["w_in_EGFD", "w_out_EDF"]
        return names + (["b_in_EGF", "b_out_ED"] if self.b_in_EGF is not None else [])

    def keep_experts(self, first: int, count: int) -> None:
        """Expert parallelism: keep experts [first, first + count) of the bank; the others live on other ranks.
        `first_expert` and `total_experts` say which slice this is (checkpoints always hold every expert). A bank
        built on the meta device (`experts_on_meta`) materialises the slice alone."""
        if self.w_in_EGFD.is_meta:
            self.materialise(first, count)
            return
        for name in self.expert_weights:
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.data[first : first + count].clone(), old.requires_grad))
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
        token_rows: Optional[TokenRows] = None,
    ) -> torch.Tensor:
        """Sorted rows (R, D) and int32 cumulative row counts per expert (E,) -> expert outputs (R, D), each row
        multiplied by scale_R (the routing weights) if given: applied to the hidden activations when those are
        narrower than the output (fine-grained experts), else to the output, whichever touches fewer numbers.

        With index_R, x_RD is the source (Q, D) of the rows and row r is x_RD[index_R[r]]: gathered inside the
        first GEMM, so the R gathered rows are not kept for backward. token_rows, index_R's inverse for the source's
        first T rows (the tokens), lets the source's gradient be summed by gather (expert_kernels.TokenRows)."""
        align = group_alignment(x_RD.device, self._compute_dtype(x_RD))
        if align == 1 or x_RD.shape[0] == 0 or self.b_in_EGF is not None:  # biases: rows in plain groups
            return self.on_groups(x_RD, offs_E, scale_R, index_R, 0, token_rows)
        return on_aligned_groups(
            self.on_groups, x_RD, offs_E, scale_R, index_R, align, self.macs_per_row, self.cpu_layout, token_rows
        )

    def forward_in_parts(
        self, x_RD: torch.Tensor, parts: list[tuple[int, int, torch.Tensor]], scale_R: torch.Tensor
    ) -> torch.Tensor:
        """`forward` on each part (start, end, offs_E) of the rows in turn, concatenated: one call of the bank
        whatever the number of parts (a sharded bank, trainer=fsdp, gathers its weights once per call)."""
        return torch.cat([self.forward(x_RD[start:end], offs_E, scale_R[start:end]) for start, end, offs_E in parts])

    @property
    def macs_per_row(self) -> int:
        """Multiply-adds of one row through one expert (both GEMMs)."""
        gated = ACTIVATIONS[self.activation][1]
        return self.w_in_EGFD.shape[-1] * self.hidden * (3 if gated else 2)

    def on_groups(
        self,
        x_RD: torch.Tensor,
        offs_E: torch.Tensor,
        scale_R: Optional[torch.Tensor],
        index_R: Optional[torch.Tensor],
        block: int = 0,
        token_rows: Optional[TokenRows] = None,
    ) -> torch.Tensor:
        """The experts on rows grouped by expert: x W_in, the activation, x W_out, each row scaled by its routing
        weight; the rows laid out as `split_grouped_mm` reads them (block > 0 needs index_R)."""
        dtype = self._compute_dtype(x_RD)
        if index_R is None:
            h_RGF = grouped_mm(x_RD.to(dtype), self.w_in_EGFD.to(dtype), offs_E)
        else:
            w_EGFD = self.w_in_EGFD.to(dtype)
            h_RGF = gather_grouped_mm(x_RD.to(dtype), index_R, w_EGFD, offs_E, block, token_rows)
        expert_R = grouped_R = None
        if self.b_in_EGF is not None:  # each row's expert, from the cumulative row counts (block is 0 here)
            rows_R = torch.arange(h_RGF.shape[0], device=offs_E.device, dtype=offs_E.dtype)
            expert_R = torch.searchsorted(offs_E, rows_R, right=True).clamp(max=self.num_experts - 1)
            grouped_R = (rows_R < offs_E[-1]).to(dtype)[:, None]  # rows past the groups (dropped) get no bias
            h_RGF = h_RGF + self.b_in_EGF.to(dtype)[expert_R] * grouped_R
        scale_R = scale_R.to(dtype) if scale_R is not None else None
        # Scaling the hidden activations is the same as scaling the output only without an output bias.
        scale_hidden = scale_R is not None and self.hidden <= x_RD.shape[1] and expert_R is None
        if self.activation == "swiglu":
            a_RF = scaled_swiglu(h_RGF, scale_R if scale_hidden else None)
        else:
            a_RF = apply_activation(h_RGF, self.activation)
            if scale_hidden and scale_R is not None:
                a_RF = a_RF * scale_R[:, None]
        y_RD = split_grouped_mm(a_RF, self.w_out_EDF.to(dtype), offs_E, block)
        if self.b_out_ED is not None and expert_R is not None and grouped_R is not None:
            y_RD = y_RD + self.b_out_ED.to(dtype)[expert_R] * grouped_R
        return y_RD * scale_R[:, None] if scale_R is not None and not scale_hidden else y_RD

    def expert_forward(self, expert: int, x_RD: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows, with plain matmuls: the building block of the reference loop."""
        dtype = self._compute_dtype(x_RD)
        h = x_RD.to(dtype) @ self.w_in_EGFD[expert].to(dtype).t()
        if self.b_in_EGF is not None:
            h = h + self.b_in_EGF[expert].to(dtype)
        y = apply_activation(h, self.activation) @ self.w_out_EDF[expert].to(dtype).t()
        return y + self.b_out_ED[expert].to(dtype) if self.b_out_ED is not None else y


def residual_out_std(init_std: float, n_layers: int) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return init_std / math.sqrt(2 * n_layers)
