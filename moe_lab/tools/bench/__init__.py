"""`moe-lab bench`: how fast the MoE layer and whole training steps are, against references.

For each case of a grid (tokens, d_model, experts, top_k, expert width, capacity factor or dropless) and each
implementation it times the MoE layer's forward (no grad) and forward + backward with warm-up, several repeats and the
median (synchronising the device), and records the activation memory saved for the backward pass (and the peak
allocated memory on a GPU). Implementations:
    grouped       moe-lab's layer: sort-based dispatch, torch._grouped_mm
    loop          moe-lab's per-expert reference (the test oracle)
    hf_eager, hf_grouped, torchtitan, olmo_core
                  the peers' MoE layers on the same weights (--compare; peers.py), each checked to compute
                  moe-lab's output and input gradient before it is timed, or listed as not timed with the reason
    dense         a dense SwiGLU FFN with the MoE's active parameters: hidden = top_k x expert width (--compare)
It also times whole training steps (forward, backward, AdamW) of model presets, with tokens/s and, on GPUs in
moe-lab's peak table, MFU from 6 x active parameters + attention FLOPs per token; and with --compare, a whole
dropless model against the same weights exported to transformers. Ratios against the targets close the table.

One module per concern: `cases` (the grid, timing, saved memory), `layer` (one MoE layer and its peers, with
`peers`), `steps` (whole training steps and whole models), `peaks` (the machine's GEMM peaks), `baseline` (the
default step against float32 eager, interleaved), `report` (ratios against the bars, the table, the files) and `main`
(what the arguments ask for).
"""

from moe_lab.tools.bench.main import measure, run

__all__ = ["measure", "run"]
