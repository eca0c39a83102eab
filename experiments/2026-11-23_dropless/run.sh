#!/usr/bin/env bash
# Finding 5, in the study regime (study=capacity: d_model 64, 2 layers, 1200 steps of 32 x 128 tokens = 4.9M tokens,
# seeds paired across configurations): dropless routing beats token dropping at equal steps and tokens (MegaBlocks,
# Gale et al. 2023; OLMoE). The default MoE (top-2 of 8 experts) trained with capacity factor 1.0 (drops the most),
# 1.25 (the default) or without a limit (dropless), 3 paired seeds each. Validation is dropless for all three
# (model.moe.eval_capacity_factor=null), so only training differs. Run from an empty directory; about 21 minutes on
# 2 CPU cores. The short-budget result of 2026-11-23 (200 steps of the default backbone) is run_short_budget.sh.
set -euo pipefail
moe-lab train -m study=capacity capacity=cf1_0,cf1_25,dropless model.moe.eval_capacity_factor=null seed=1,2,3 \
    hydra.sweep.dir=sweep
moe-lab dashboard sweep -o dropless.html
