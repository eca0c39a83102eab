#!/usr/bin/env bash
# Finding 8, with seeds: upcycling a dense checkpoint beats training the MoE from scratch at equal tokens
# (Komatsuzaki et al. 2022). 3 seeds (about 20 minutes on 2 CPU cores; run from an empty directory): a dense model
# (experts=dense, FFN 384) trained 150 steps and upcycled with upcycle=copy into top-2 of 8 experts for 150 more,
# against the same MoE from scratch for 300 steps (equal tokens: 300 x 16 x 256). Validation is dropless.
set -euo pipefail
common="trainer.val_check_interval=50 model.moe.eval_capacity_factor=null"
moe-lab train -m experts=dense seed=1,2,3 trainer.max_steps=150 trainer.val_check_interval=50 \
    hydra.sweep.dir=dense 'hydra.sweep.subdir=${seed}'
moe-lab train -m 'model.init_from=dense/${seed}/checkpoints/last.ckpt' upcycle=copy experts=e8 seed=1,2,3 \
    trainer.max_steps=150 $common hydra.sweep.dir=copy
moe-lab train -m experts=e8 seed=1,2,3 trainer.max_steps=300 $common hydra.sweep.dir=scratch
moe-lab dashboard scratch copy -o upcycling_seeds.html
