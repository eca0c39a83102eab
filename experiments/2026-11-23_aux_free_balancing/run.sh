#!/usr/bin/env bash
# Finding 3, in the study regime (study=capacity: d_model 64, 2 layers, 1200 steps of 32 x 128 tokens = 4.9M tokens,
# seeds paired across configurations): aux-loss-free bias balancing (DeepSeek-V3; Wang et al. 2024) balances the
# experts without an aux loss and without hurting the loss. 3 seeds of router=aux_free aux_loss=none at DeepSeek-V3's
# bias step (1e-3) and at 10x that step (about 14 minutes on 2 CPU cores), against finding 2's runs of the same MoE
# with no router loss and with the Switch loss, in the same regime (its run.sh runs them first if they are not there:
# 14 minutes more). Run from an empty directory, or beside finding 2's sweep (BASELINE=path/to/its/sweep).
# The short-budget result of 2026-11-23 (200 steps of the default backbone) is run_short_budget.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
baseline=${BASELINE:-load_balancing/sweep}
if [ ! -f "$baseline/sweep_summary.csv" ]; then
  mkdir -p "$(dirname "$baseline")" && (cd "$(dirname "$baseline")" && bash "$here/../2026-11-23_load_balancing/run.sh")
fi
moe-lab train -m study=capacity router=aux_free aux_loss=none seed=1,2,3 hydra.sweep.dir=sweep
moe-lab train -m study=capacity router=aux_free aux_loss=none model.moe.router.bias_update_rate=1e-2 seed=1,2,3 \
    hydra.sweep.dir=sweep_rate1e-2
moe-lab dashboard "$baseline" sweep sweep_rate1e-2 -o aux_free.html
