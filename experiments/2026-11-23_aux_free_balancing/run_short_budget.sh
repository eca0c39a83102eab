#!/usr/bin/env bash
# Finding 3, the short budget of 2026-11-23: aux-loss-free bias balancing (DeepSeek-V3; Wang et al. 2024) balances the experts without an aux loss
# and without hurting the loss. 3 seeds of router=aux_free aux_loss=none, at DeepSeek-V3's bias step and at 10x that
# step (about 13 minutes on 2 CPU cores), compared with finding 2's runs of the same MoE with no router loss and with
# the Switch loss (its run.sh runs them first if they are not there: 12 minutes more). Same settings as finding 2:
# top-2 of 8 experts, capacity factor 1.25 in training, 200 steps of 16 x 256 tokens.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
baseline=${BASELINE:-load_balancing_short/sweep}
if [ ! -f "$baseline/sweep_summary.csv" ]; then
  mkdir -p "$(dirname "$baseline")" && (cd "$(dirname "$baseline")" && bash "$here/../2026-11-23_load_balancing/run_short_budget.sh")
fi
moe-lab train -m router=aux_free aux_loss=none seed=1,2,3 trainer.max_steps=200 trainer.val_check_interval=50 \
    hydra.sweep.dir=sweep
# The one thing varied, stated as such: DeepSeek-V3's bias step (1e-3) moves a bias by at most 0.2 in 200 steps;
# 10x that step shows whether the mechanism balances when it has time to.
moe-lab train -m router=aux_free aux_loss=none model.moe.router.bias_update_rate=1e-2 seed=1,2,3 \
    trainer.max_steps=200 trainer.val_check_interval=50 hydra.sweep.dir=sweep_rate1e-2
moe-lab dashboard "$baseline" sweep sweep_rate1e-2 -o aux_free.html
