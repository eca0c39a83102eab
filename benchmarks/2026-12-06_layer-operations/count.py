"""Aten operations and GPU kernels per forward + backward of one MoE layer, moe-lab's (with and without its aux
losses) against transformers' grouped Mixtral block on the same weights, at the bench's three cases.

    python benchmarks/2026-12-06_layer-operations/count.py

Training mode, a step that does not log (no routing statistic is read), float32 on the CPU; counted at dispatch by
`moe_lab.tools.bench.cases.count_ops` (kernels: operations that are neither views nor unfilled allocations).
"""

from __future__ import annotations

import dataclasses

import torch

from moe_lab.model.config import AuxLossConfig
from moe_lab.tools.bench import cases, layer, peers
from moe_lab.tools.bench.cases import count_ops


def one_step(module, forward, x, grad):
    def step():
        module.zero_grad(set_to_none=True)
        forward(x).backward(grad)

    step()  # first calls may initialise state
    return step


def main() -> None:
    print(f"{'case':<10} {'moe-lab':>16} {'without aux':>16} {'transformers':>16}   (aten ops / kernels; host reads)")
    for case in cases.COMPARE_CASES:
        ours = layer.moe_layer(case, "grouped", torch.device("cpu"), torch.float32).train()
        theirs = peers.hf_grouped(ours, case, torch.device("cpu"), torch.float32).train()
        torch.manual_seed(1)
        x = torch.randn(1, case.tokens, case.d_model, requires_grad=True)
        grad = torch.randn_like(x)
        with_aux = count_ops(one_step(ours, lambda t: ours(t)[0], x, grad))
        ours.cfg = dataclasses.replace(ours.cfg, aux_loss=AuxLossConfig(load_balance=0.0, z_loss=0.0))
        bare = count_ops(one_step(ours, lambda t: ours(t)[0], x, grad))
        hf = count_ops(one_step(theirs, theirs, x, grad))
        cells = [f"{c.total} / {c.kernels}; {c.host_reads}" for c in (with_aux, bare, hf)]
        print(f"{case.name:<10} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")


if __name__ == "__main__":
    main()
