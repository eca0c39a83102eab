#!/bin/bash
# tokens/s of the default run alone and beside a busy twin, OpenMP's default (active) wait policy and passive
. /work/main/.venv/bin/activate
steps=80
one() { moe-lab train trainer.max_steps=$steps trainer.val_check_interval=$steps metrics.dashboard=false hydra.run.dir=/tmp/share/$1 > /tmp/share/$1.log 2>&1; }
for round in 1 2; do
  for policy in active passive; do
    if [ $policy = passive ]; then export OMP_WAIT_POLICY=PASSIVE; else unset OMP_WAIT_POLICY; fi
    one alone-$policy-$round
    ( one twinA-$policy-$round & one twinB-$policy-$round & wait )
  done
done
for f in /tmp/share/*/summary.json; do python -c "import json,sys; s=json.load(open('$f')); print('$f'.split('/')[3], round(s['tokens_per_sec_run']))"; done
