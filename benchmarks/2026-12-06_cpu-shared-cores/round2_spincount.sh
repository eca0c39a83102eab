#!/bin/bash
. /work/main/.venv/bin/activate
steps=80
one() { moe-lab train trainer.max_steps=$steps trainer.val_check_interval=$steps metrics.dashboard=false hydra.run.dir=/tmp/share/$1 > /tmp/share/$1.log 2>&1; }
for spins in 1000 20000 default; do
  if [ $spins = default ]; then unset GOMP_SPINCOUNT; else export GOMP_SPINCOUNT=$spins; fi
  one s-alone-$spins
  ( one s-twinA-$spins & one s-twinB-$spins & wait )
done
for f in /tmp/share/s-*/summary.json; do python -c "import json,sys; s=json.load(open('$f')); print('$f'.split('/')[3], round(s['tokens_per_sec_run']))"; done
