#!/usr/bin/env bash
# Finding 7: a mixture of experts learns faster than one network of equal size (Jacobs et al. 1991).
# (1) The paper's kind of task, synthetic: jacobs.py, 60 seeds per learner, paired by seed (about 4 minutes).
# (2) The language model, in the study regime (study=capacity: d_model 64, 2 layers, 1200 steps of 32 x 128 tokens,
#     seeds paired): optimizer steps for the MoE (model=tiny) and the dense model of equal total parameters
#     (model=dense_tiny_total) to reach each validation loss, validated every 50 steps; 5 seeds (about 25 minutes).
# Run from an empty directory on 2 CPU cores. The short-budget version (2026-11-23) is run_short_budget.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python "$here/jacobs.py" --seeds 60 -o results.json --figure jacobs.png
moe-lab train -m study=capacity model=tiny,dense_tiny_total seed=${SEEDS:-1,2,3,4,5} trainer.val_check_interval=50 \
    hydra.sweep.dir=sweep
python "$here/lm_steps.py" sweep -o lm_steps.json
