#!/bin/bash
. /work/main/.venv/bin/activate
steps=80
one() { moe-lab train trainer.max_steps=$steps trainer.val_check_interval=$steps metrics.dashboard=false hydra.run.dir=/tmp/share/$1 > /tmp/share/$1.log 2>&1; }
for round in 1 2; do
  for spins in default 1000 100; do
    if [ $spins = default ]; then unset GOMP_SPINCOUNT; else export GOMP_SPINCOUNT=$spins; fi
    one r-alone-$spins-$round
  done
done
export GOMP_SPINCOUNT=100
( one r-twinA-100 & one r-twinB-100 & wait )
export GOMP_SPINCOUNT=1000
( one r-twinA-1000 & one r-twinB-1000 & wait )
for f in /tmp/share/r-*/summary.json; do python -c "import json,sys; s=json.load(open('$f')); print('$f'.split('/')[3], round(s['tokens_per_sec_run']))"; done
