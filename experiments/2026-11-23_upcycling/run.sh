#!/usr/bin/env bash
# Finding 8, in the study regime (study=capacity: d_model 64, 2 layers, 32 x 128 tokens per step, seeds paired):
# upcycling a dense checkpoint beats training the MoE from scratch at equal tokens (Komatsuzaki et al. 2022).
# 6 seeds (about 30 minutes on 2 CPU cores; run from an empty directory): a dense model (experts=dense, FFN 384)
# trained 600 steps, upcycled with upcycle=copy into top-2 of 8 experts of width 384 and trained 600 steps more,
# against the same MoE from scratch for 1200 steps: 4.9M training tokens each. Every run has its own warm-up and
# cosine schedule; validation is dropless. The upcycled phase starts its data at batch 0 again, so it re-reads the
# batches its dense model saw (a handicap to upcycling; the scratch run sees each block about once).
# The short-budget result (150 + 150 against 300 steps of the default backbone) is run_short_budget.sh.
set -euo pipefail
seeds=${SEEDS:-1,2,3,4,5,6}
moe-lab train -m study=capacity experts=dense seed=$seeds trainer.max_steps=600 \
    hydra.sweep.dir=dense 'hydra.sweep.subdir=${seed}'
moe-lab train -m study=capacity 'model.init_from=dense/${seed}/checkpoints/last.ckpt' upcycle=copy experts=e8 \
    seed=$seeds trainer.max_steps=600 model.moe.eval_capacity_factor=null hydra.sweep.dir=copy
moe-lab train -m study=capacity experts=e8 seed=$seeds model.moe.eval_capacity_factor=null hydra.sweep.dir=scratch
moe-lab dashboard scratch copy -o upcycling.html
