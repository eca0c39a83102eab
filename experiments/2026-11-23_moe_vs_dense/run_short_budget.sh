#!/usr/bin/env bash
# Finding 1, the short budget of 2026-11-23 (results/short_budget/): MoE against dense at equal active and at equal
# total parameters, 3 seeds each (run from an empty
# directory; under 30 minutes on 2 CPU cores). The default tiny backbone (4 layers, d_model 128), embedded corpus,
# 200 steps of 16 x 256 tokens: model=tiny (top-2 of 8 experts of width 384: 5.05M parameters, 1.48M active),
# model=dense_tiny (FFN 768: 1.51M parameters, 1.47M active) and model=dense_tiny_total (FFN 3072: 5.05M, all active).
set -euo pipefail
moe-lab train -m model=tiny,dense_tiny,dense_tiny_total seed=1,2,3 trainer.max_steps=200 \
    trainer.val_check_interval=50 hydra.sweep.dir=sweep
moe-lab dashboard sweep -o moe_vs_dense.html
