#!/usr/bin/env bash
# Finding 1: MoE against dense at equal active and at equal total parameters, in the study regime (study=capacity:
# d_model 64, 2 layers, 1200 steps of 32 x 128 tokens = 4.9M tokens), 3 paired seeds each (the same data order and
# the same embeddings, attention and output head under one seed). Run from an empty directory; under 30 minutes on
# 2 CPU cores. model=tiny (top-2 of 8 experts of width 384: 1.25M parameters, 0.35M active), model=dense_tiny (FFN
# 768: 0.37M, 0.35M active) and model=dense_tiny_total (FFN 3072: 1.25M, all active).
# The short-budget result of 2026-11-23 (200 steps of the default backbone) is run_short_budget.sh.
set -euo pipefail
moe-lab train -m study=capacity model=tiny,dense_tiny,dense_tiny_total seed=1,2,3 hydra.sweep.dir=sweep
moe-lab dashboard sweep -o moe_vs_dense.html
