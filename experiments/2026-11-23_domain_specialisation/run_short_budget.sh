#!/usr/bin/env bash
# Finding 6, short budget (2026-11-23; the study-regime run is run.sh): experts specialise by domain without supervision (Jacobs et al. 1991; OLMoE), against the upper bound of
# router=domain_oracle (each domain's tokens to experts of its own). 3 seeds each (about 20 minutes on 2 CPU
# cores): the default MoE (top-2 of 8 experts), the oracle at its default top-1 and at top-2 (the learned router's
# active parameters: the fair loss comparison), 250 steps of 16 x 256 tokens of the embedded corpus
# (code, docs, math), routing analyses on the validation data every 50 steps; then moe-lab analyze on each final
# checkpoint (domain shares per layer, against the uniform k/E).
set -euo pipefail
common="seed=1,2,3 trainer.max_steps=250 trainer.val_check_interval=50 metrics.analysis_every_n_steps=50"
moe-lab train -m router=topk $common hydra.sweep.dir=learned
moe-lab train -m router=domain_oracle aux_loss=none $common hydra.sweep.dir=oracle
moe-lab train -m router=domain_oracle aux_loss=none model.moe.router.top_k=2 $common hydra.sweep.dir=oracle_top2
for sweep in learned oracle oracle_top2; do
  for job in 0 1 2; do
    moe-lab analyze $sweep/$job/checkpoints/last.ckpt -o $sweep/$job/analysis.html
  done
done
moe-lab dashboard learned oracle oracle_top2 -o domain_specialisation.html
python "$(dirname "$0")/summarise.py" learned oracle oracle_top2 -o summary.json
