#!/usr/bin/env bash
# Finding 4, the short budget of 2026-11-23: fine-grained experts with shared experts beat coarse experts at equal active and total parameters
# (DeepSeekMoE, Dai et al. 2024). 3 seeds each (about 30 minutes on 2 CPU cores), 200 steps of 16 x 256 tokens, the
# default tiny backbone; every MoE has 3072 expert units per layer in total (4.72M routed parameters) and 768 active
# per token:
#   coarse        experts=e8: top-2 of 8 experts of width 384 (the default MoE)
#   fine          experts=e64_fine, top-16: 64 experts of width 48 (granularity 8)
#   fine+shared   experts=e64_fine_shared with 62 routed experts, top-14, plus 2 shared (DeepSeekMoE's isolation)
set -euo pipefail
common="seed=1,2,3 trainer.max_steps=200 trainer.val_check_interval=50"
moe-lab train -m experts=e8 $common hydra.sweep.dir=coarse
moe-lab train -m experts=e64_fine model.moe.router.top_k=16 $common hydra.sweep.dir=fine
moe-lab train -m experts=e64_fine_shared model.moe.num_experts=62 model.moe.router.top_k=14 $common \
    hydra.sweep.dir=fine_shared
moe-lab dashboard coarse fine fine_shared -o fine_grained.html
