#!/usr/bin/env bash
# Expert pruning criteria on trained models: which experts to remove, by routing frequency, REAP, EAN, the measured
# loss of removing each, or at random. Two models, 3 seeds each, trained here: the default tiny model (8 experts,
# top-2, 4 MoE layers) and the DeepSeek-V3-style preset (16 fine experts in 4 groups, top-4 within 2 groups,
# aux-loss-free bias, a shared expert), the latter exported to Hugging Face and imported back, so that it is pruned as
# an imported model (no pretrained hub model can be downloaded on this machine). Then prune_eval.py scores every
# model's experts on the even held-out batches and measures the loss of each pruned model on the odd ones.
# Output: outputs/expert_pruning/; results/*.csv.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-outputs/expert_pruning}
steps=${STEPS:-400}
steps_imported=${STEPS_IMPORTED:-200}  # the DeepSeek-V3-style model is slower per step on a CPU
for seed in 1 2 3; do
  [ -f $out/tiny-$seed/summary.json ] || moe-lab train seed=$seed trainer.max_steps=$steps \
    trainer.val_check_interval=$steps hydra.run.dir=$out/tiny-$seed metrics.dashboard=false > /dev/null
  [ -f $out/dsv3-$seed/summary.json ] || moe-lab train model=deepseek_v3_tiny seed=$seed \
    trainer.max_steps=$steps_imported trainer.val_check_interval=$steps_imported hydra.run.dir=$out/dsv3-$seed \
    metrics.dashboard=false > /dev/null
  [ -d $out/dsv3-$seed-hf ] || moe-lab export $out/dsv3-$seed/checkpoints/last.ckpt --format hf $out/dsv3-$seed-hf > /dev/null
  [ -d $out/dsv3-$seed-imported ] || moe-lab import $out/dsv3-$seed-hf $out/dsv3-$seed-imported > /dev/null
done
mkdir -p "$here/results"
python "$here/prune_eval.py" --keep 6 4 2 --out "$here/results/tiny.csv" $out/tiny-{1,2,3}/checkpoints/last.ckpt
python "$here/prune_eval.py" --keep 12 8 --out "$here/results/dsv3_imported.csv" \
  $out/dsv3-{1,2,3}-imported/model.ckpt
python "$here/prune_eval.py" --summarise "$here/results/tiny.csv" "$here/results/dsv3_imported.csv"
