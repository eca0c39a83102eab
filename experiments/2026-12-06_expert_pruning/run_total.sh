#!/usr/bin/env bash
# A total budget against the same number per layer: the default model's 3 seeds (as run.sh trains them), each
# criterion's scores, then keep k experts in every layer or k x 4 over the 4 MoE layers (`moe-lab prune --keep-total`),
# the held-out loss of each on the odd batches. Output: results/tiny_total.csv and the summary on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-outputs/expert_pruning}
steps=${STEPS:-400}
for seed in 1 2 3; do
  [ -f $out/tiny-$seed/summary.json ] || moe-lab train seed=$seed trainer.max_steps=$steps \
    trainer.val_check_interval=$steps hydra.run.dir=$out/tiny-$seed metrics.dashboard=false > /dev/null
done
mkdir -p "$here/results"
python "$here/prune_eval.py" --keep 6 4 2 --budget per_layer total --out "$here/results/tiny_total.csv" \
  $out/tiny-{1,2,3}/checkpoints/last.ckpt
python "$here/prune_eval.py" --summarise "$here/results/tiny_total.csv"
