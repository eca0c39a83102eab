#!/usr/bin/env bash
# The default `moe-lab train` (here: bf16-mixed, compiled) alone, then beside a busy twin (the same command, started
# together) on the same 2 cores; nothing in the environment (moe-lab sets GOMP_SPINCOUNT itself). 120 steps each,
# 2 threads each (`threads` unset); per run the median tokens/s of the logging windows after step 40 (after
# compiling) and the run average (`tokens_per_sec_run`, compiling included).
#     shared_cores.sh OUT_DIR ROUNDS
set -euo pipefail
out=$(realpath -m "$1"); rounds=${2:-2}; mkdir -p "$out"
unset GOMP_SPINCOUNT OMP_WAIT_POLICY
one() { moe-lab train trainer.max_steps=120 metrics.dashboard=false hydra.run.dir="$out/$1" > "$out/$1.log" 2>&1; }
for r in $(seq 1 "$rounds"); do
    one "r${r}_alone"
    ( one "r${r}_twinA" & one "r${r}_twinB" & wait )
done
python - "$out" <<'PY'
import csv, glob, json, os, statistics, sys
for d in sorted(glob.glob(os.path.join(sys.argv[1], "r*_*/"))):
    w = [float(r["train/tokens_per_sec"]) for r in csv.DictReader(open(d + "metrics.csv"))
         if r.get("train/tokens_per_sec") and int(r["step"]) > 40]
    run = json.load(open(d + "summary.json"))["tokens_per_sec_run"]
    print(f"{os.path.basename(d[:-1]):10s} windows after step 40: median {statistics.median(w):7.0f} tokens/s; run average {run:7.0f}")
PY
grep -h "warning: the machine" "$out"/r*_twin?.log | head -1 || true
