#!/bin/bash
# moe-lab as shipped (4218102: GOMP_SPINCOUNT=1000 set by moe-lab itself), nothing in the environment
. /work/main/.venv/bin/activate
unset GOMP_SPINCOUNT OMP_WAIT_POLICY
steps=80
one() { moe-lab train trainer.max_steps=$steps trainer.val_check_interval=$steps metrics.dashboard=false hydra.run.dir=/tmp/share/$1 > /tmp/share/$1.log 2>&1; }
one v-alone
( one v-twinA & one v-twinB & wait )
for f in /tmp/share/v-*/summary.json; do python -c "import json,sys; s=json.load(open('$f')); print('$f'.split('/')[3], round(s['tokens_per_sec_run']))"; done
grep -h "warning: the machine" /tmp/share/v-twin?.log | head -2
