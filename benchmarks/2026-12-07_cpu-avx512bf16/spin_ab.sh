#!/usr/bin/env bash
# The default run alone with moe-lab's short OpenMP spin (GOMP_SPINCOUNT=1000, which moe-lab sets unless the user
# chose) against libgomp's default spin (GOMP_SPINCOUNT=300000, as before 4218102), interleaved: does the short spin
# cost the compiled bf16-mixed step anything alone? 120 steps, the logging windows after step 40.
#     spin_ab.sh OUT_DIR ROUNDS
set -euo pipefail
out=$(realpath -m "$1"); rounds=${2:-3}; mkdir -p "$out"
one() { GOMP_SPINCOUNT=$2 moe-lab train trainer.max_steps=120 metrics.dashboard=false hydra.run.dir="$out/$1" > "$out/$1.log" 2>&1; }
for r in $(seq 1 "$rounds"); do
    if (( r % 2 )); then one "r${r}_spin1000" 1000; one "r${r}_spin300000" 300000
    else one "r${r}_spin300000" 300000; one "r${r}_spin1000" 1000; fi
done
python - "$out" <<'PY'
import csv, glob, os, statistics, sys, collections
per = collections.defaultdict(dict)
for d in sorted(glob.glob(os.path.join(sys.argv[1], "r*_*/"))):
    r, name = os.path.basename(d[:-1]).split("_", 1)
    w = [float(x["train/tokens_per_sec"]) for x in csv.DictReader(open(d + "metrics.csv"))
         if x.get("train/tokens_per_sec") and int(x["step"]) > 40]
    per[r][name] = statistics.median(w)
for r, v in per.items():
    print(f"{r}: spin 1000 {v['spin1000']:.0f}, spin 300000 {v['spin300000']:.0f} tokens/s; 1000 / 300000 "
          f"{v['spin1000'] / v['spin300000']:.3f}")
PY
