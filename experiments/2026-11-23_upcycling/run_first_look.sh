#!/usr/bin/env bash
# Upcycled vs from scratch at equal training tokens (run from an empty directory; about 15 minutes on 2 CPU cores).
# Every run: the default tiny backbone (4 layers, d_model 128, FFN 384), embedded corpus, 500 or 250 steps of
# 16 x 256 tokens, seed 1234. The MoE runs are top-2 of 8 experts of width 384 (granular: top-4 of 16 of width 192,
# the same active FFN), capacity 1.25 in training, dropless in evaluation.
set -euo pipefail
common="trainer.val_check_interval=50 model.moe.eval_capacity_factor=null"
moe-lab train experts=dense trainer.max_steps=250 trainer.val_check_interval=50 hydra.run.dir=dense250
moe-lab train experts=dense trainer.max_steps=500 trainer.val_check_interval=50 hydra.run.dir=dense500
moe-lab train experts=e8 trainer.max_steps=500 $common hydra.run.dir=scratch500
moe-lab train model.init_from=dense250/checkpoints/last.ckpt upcycle=copy experts=e8 trainer.max_steps=250 $common \
    hydra.run.dir=copy
moe-lab train model.init_from=dense250/checkpoints/last.ckpt upcycle=drop experts=e8 trainer.max_steps=250 $common \
    hydra.run.dir=drop
moe-lab train model.init_from=dense250/checkpoints/last.ckpt upcycle=granular experts=e16 \
    model.moe.router.top_k=4 trainer.max_steps=250 $common hydra.run.dir=granular
# The control: the dense model continued with the same re-warmed schedule as the upcycled runs (a warm start).
moe-lab train model.init_from=dense250/checkpoints/last.ckpt trainer.max_steps=250 trainer.val_check_interval=50 \
    hydra.run.dir=dense_rewarm
moe-lab dashboard dense500 dense_rewarm scratch500 copy drop granular -o upcycling.html
