#!/usr/bin/env bash
# Finding 3: aux-loss-free bias balancing (DeepSeek-V3; Wang et al. 2024) balances the experts without an aux loss
# and without hurting the loss. 3 seeds of router=aux_free aux_loss=none (about 8 minutes on 2 CPU cores), compared
# with finding 2's runs of the same MoE with no router loss and with the Switch loss (its run.sh runs them first if
# they are not there: 15 minutes more). Same settings as finding 2: top-2 of 8 experts, capacity factor 1.25 in
# training, 200 steps of 16 x 256 tokens.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
baseline=${BASELINE:-../2026-11-23_load_balancing/sweep}
if [ ! -f "$baseline/sweep_summary.csv" ]; then
  mkdir -p "$(dirname "$baseline")" && (cd "$(dirname "$baseline")" && bash "$here/../2026-11-23_load_balancing/run.sh")
fi
moe-lab train -m router=aux_free aux_loss=none seed=1,2,3 trainer.max_steps=200 trainer.val_check_interval=50 \
    hydra.sweep.dir=sweep
moe-lab dashboard "$baseline" sweep -o aux_free.html
