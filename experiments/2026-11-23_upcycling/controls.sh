#!/usr/bin/env bash
# Finding 8, the two comparisons beside run.sh's (run in the same directory after it; about 12 minutes on 2 CPU
# cores): at equal *extra* tokens, the MoE from scratch for 600 steps only (what upcycling's 600 steps are set
# against in Komatsuzaki et al.'s figures, the dense model's tokens counted as sunk), and the dense model continued
# for the same 600 steps with the same re-warmed schedule (model.init_from without upcycle=: a warm start).
set -euo pipefail
seeds=${SEEDS:-1,2,3,4,5,6}
moe-lab train -m study=capacity experts=e8 seed=$seeds trainer.max_steps=600 model.moe.eval_capacity_factor=null \
    hydra.sweep.dir=scratch600
moe-lab train -m study=capacity experts=dense 'model.init_from=dense/${seed}/checkpoints/last.ckpt' seed=$seeds \
    trainer.max_steps=600 hydra.sweep.dir=dense_continued
moe-lab dashboard scratch copy scratch600 dense_continued -o upcycling_all.html
