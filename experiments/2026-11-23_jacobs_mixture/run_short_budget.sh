#!/usr/bin/env bash
# Finding 7: a mixture of experts learns faster than one network of equal size (Jacobs et al. 1991).
# (1) The paper's kind of task, synthetic: jacobs.py, 20 seeds per learner (a few minutes on 2 CPU cores).
# (2) The language-model version: steps for the default MoE (5.05M parameters) and the dense model of equal total
#     size (model=dense_tiny_total) to reach a validation loss, from finding 1's runs (its run.sh runs them first if
#     they are not there: about 30 minutes).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python "$here/jacobs.py" --seeds 20 -o results.json --figure jacobs.png
runs=${RUNS:-../2026-11-23_moe_vs_dense/sweep}
if [ ! -f "$runs/sweep_summary.csv" ]; then
  mkdir -p "$(dirname "$runs")" && (cd "$(dirname "$runs")" && bash "$here/../2026-11-23_moe_vs_dense/run_short_budget.sh")
fi
python "$here/lm_steps.py" "$runs" -o lm_steps.json
