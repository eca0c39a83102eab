#!/usr/bin/env bash
# Finding 2: without a load-balancing loss the router collapses onto few experts; the Switch loss keeps it balanced.
# 3 seeds each (run from an empty directory; about 15 minutes on 2 CPU cores). The default MoE (top-2 of 8 experts,
# capacity factor 1.25 in training), 200 steps of 16 x 256 tokens, with aux_loss=none (no router loss at all) or
# aux_loss=switch (the Switch Transformer's load-balancing loss, weight 0.01).
set -euo pipefail
moe-lab train -m aux_loss=none,switch seed=1,2,3 trainer.max_steps=200 trainer.val_check_interval=50 \
    hydra.sweep.dir=sweep
moe-lab dashboard sweep -o load_balancing.html
