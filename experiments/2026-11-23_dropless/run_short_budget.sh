#!/usr/bin/env bash
# Finding 5, the short budget of 2026-11-23: dropless routing beats token dropping at equal steps and tokens (MegaBlocks, Gale et al. 2023; OLMoE).
# 3 seeds each (about 25 minutes on 2 CPU cores): the default MoE (top-2 of 8 experts) trained with capacity factor
# 1.0 (drops the most), 1.25 (the default) or without a limit (dropless), 200 steps of 16 x 256 tokens. Validation is
# dropless for all three (model.moe.eval_capacity_factor=null), so only training differs.
set -euo pipefail
moe-lab train -m capacity=cf1_0,cf1_25,dropless model.moe.eval_capacity_factor=null seed=1,2,3 \
    trainer.max_steps=200 trainer.val_check_interval=50 hydra.sweep.dir=sweep
moe-lab dashboard sweep -o dropless.html
