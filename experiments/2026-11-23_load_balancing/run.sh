#!/usr/bin/env bash
# Finding 2, in the study regime (study=capacity: d_model 64, 2 layers, 1200 steps of 32 x 128 tokens = 4.9M tokens,
# seeds paired across configurations): without a load-balancing loss the router collapses onto few experts; the Switch
# loss keeps it balanced. The default MoE (top-2 of 8 experts of width 384, capacity factor 1.25 in training) with
# aux_loss=none (no router loss at all) or aux_loss=switch (the Switch Transformer's load-balancing loss, weight 0.01),
# 3 paired seeds each. Run from an empty directory; about 14 minutes on 2 CPU cores.
# The short-budget result of 2026-11-23 (200 steps of the default backbone) is run_short_budget.sh.
set -euo pipefail
moe-lab train -m study=capacity aux_loss=none,switch seed=1,2,3 hydra.sweep.dir=sweep
moe-lab dashboard sweep -o load_balancing.html
