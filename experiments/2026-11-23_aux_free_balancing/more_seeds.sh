#!/usr/bin/env bash
# Finding 3, more seeds for the loss question: router=aux_free at DeepSeek-V3's bias step (1e-3) and the Switch loss,
# seeds 4-9 in the study regime (about 30 minutes on 2 CPU cores; run from an empty directory). Seed 1 of aux_free
# is run again as a check that this commit computes what run.sh's commit did (deterministic runs: the same val/loss).
set -euo pipefail
moe-lab train -m study=capacity router=aux_free aux_loss=none seed=1,4,5,6,7,8,9 hydra.sweep.dir=aux_free_more
moe-lab train -m study=capacity aux_loss=switch seed=4,5,6,7,8,9 hydra.sweep.dir=switch_more
