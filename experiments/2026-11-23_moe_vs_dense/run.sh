#!/usr/bin/env bash
# Finding 1, the question: MoE against dense at equal active parameters, in the study regime (study=capacity:
# d_model 64, 2 layers, 1200 steps of 32 x 128 tokens = 4.9M tokens), 6 paired seeds (the same data order and the
# same embeddings, attention and output head under one seed). Run from an empty directory; about 24 minutes on 2 CPU
# cores. model=tiny (top-2 of 8 experts of width 384: 1.25M parameters, 0.35M active), model=dense_tiny (FFN 768:
# 0.37M, 0.35M active). total.sh adds the dense model of equal total parameters (about 9 minutes).
# The short-budget result of 2026-11-23 (200 steps of the default backbone) is run_short_budget.sh.
set -euo pipefail
moe-lab train -m study=capacity model=tiny,dense_tiny seed=1,2,3,4,5,6 hydra.sweep.dir=sweep
moe-lab dashboard sweep -o moe_vs_dense.html
