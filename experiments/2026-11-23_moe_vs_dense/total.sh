#!/usr/bin/env bash
# Finding 1, the second half: where does dense at equal total parameters sit? model=dense_tiny_total (FFN 3072: 1.25M
# parameters, all active) in the same regime, 3 seeds, beside run.sh's sweep (run from the same directory, after
# run.sh; about 9 minutes on 2 CPU cores).
set -euo pipefail
moe-lab train -m study=capacity model=dense_tiny_total seed=1,2,3 hydra.sweep.dir=sweep_total
moe-lab dashboard sweep sweep_total -o moe_vs_dense_total.html
