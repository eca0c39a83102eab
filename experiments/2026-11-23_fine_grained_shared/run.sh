#!/usr/bin/env bash
# Finding 4, in the study regime (study=capacity: d_model 64, 2 layers, 1200 steps of 32 x 128 tokens = 4.9M tokens,
# seeds paired across configurations): fine-grained experts with shared experts beat coarse experts at equal active
# and total parameters (DeepSeekMoE, Dai et al. 2024). 3 paired seeds each; every MoE has 3072 expert units per layer
# in total and 768 active per token:
#   coarse        experts=e8: top-2 of 8 experts of width 384 (the default MoE)
#   fine          experts=e64_fine, top-16: 64 experts of width 48 (granularity 8)
#   fine+shared   experts=e64_fine_shared with 62 routed experts, top-14, plus 2 shared (DeepSeekMoE's isolation)
# Run from an empty directory; about 30 minutes on 2 CPU cores. The short-budget result of 2026-11-23 (200 steps of
# the default backbone) is run_short_budget.sh.
set -euo pipefail
common="study=capacity seed=1,2,3"
moe-lab train -m experts=e8 $common hydra.sweep.dir=coarse
moe-lab train -m experts=e64_fine model.moe.router.top_k=16 $common hydra.sweep.dir=fine
moe-lab train -m experts=e64_fine_shared model.moe.num_experts=62 model.moe.router.top_k=14 $common \
    hydra.sweep.dir=fine_shared
moe-lab dashboard coarse fine fine_shared -o fine_grained.html
