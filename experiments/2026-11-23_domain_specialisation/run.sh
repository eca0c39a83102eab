#!/usr/bin/env bash
# Finding 6, in the study regime (study=capacity: d_model 64, 2 layers, 1200 steps of 32 x 128 tokens = 4.9M tokens,
# seeds paired across configurations): experts specialise by domain without supervision (Jacobs et al. 1991; OLMoE).
# The default MoE (top-2 of 8 experts, Switch + z losses), 3 seeds, routing analyses on the validation data every 300
# steps; then moe-lab analyze on each final checkpoint (domain shares per layer, against the uniform k/E). The domain
# oracle is not re-run: its specialisation is 1 by construction, and its loss is not the question (run_short_budget.sh
# has it). Run from an empty directory; about 15 minutes on 2 CPU cores.
set -euo pipefail
moe-lab train -m study=capacity seed=1,2,3 metrics.analysis_every_n_steps=300 hydra.sweep.dir=learned
for job in 0 1 2; do
  moe-lab analyze learned/$job/checkpoints/last.ckpt data.seq_len=128 -o learned/$job/analysis.html
done
moe-lab dashboard learned -o domain_specialisation.html
python "$(dirname "$0")/summarise.py" learned -o summary.json
