#!/usr/bin/env bash
# The study regime scan: in which budget does MoE (model=tiny) against dense at equal active parameters
# (model=dense_tiny) separate? Two seeds each (paired: the same data order and shared weights), three regimes:
#   short      the findings' budget before: default backbone (d_model 128, 4 layers), 200 steps of 16 x 256 (0.8M tokens)
#   long       the default backbone, 600 steps of 16 x 256 (2.5M tokens): more tokens, same model
#   capacity   study=capacity: d_model 64, 2 layers, 1200 steps of 32 x 128 (4.9M tokens)
# All with 1024 held-out blocks. Run from an empty directory; about 25 minutes on 2 CPU cores.
set -euo pipefail
common="model=tiny,dense_tiny seed=1,2 data.max_val_blocks=1024 metrics.dashboard=false"
moe-lab train -m $common trainer.max_steps=200 trainer.val_check_interval=100 hydra.sweep.dir=short
moe-lab train -m $common trainer.max_steps=600 trainer.val_check_interval=300 hydra.sweep.dir=long
moe-lab train -m $common study=capacity hydra.sweep.dir=capacity
