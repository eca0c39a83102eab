#!/usr/bin/env bash
# Today's default `moe-lab train` (bf16-mixed, compiled, fused AdamW, chosen by `auto` here) against fa19767's own
# bf16-mixed compiled path (`trainer.precision=bf16-mixed compile=true` there: the row the speed issue measured at
# 1.87x on its host): has anything since fa19767 slowed that path? 2 threads, the default model, 120 steps, rounds
# interleaved, each run's tokens/s per logging window after step 40.
#
# Usage: head_vs_fa19767_bf16.sh OUT_DIR ROUNDS   (run from a worktree of the commit under test, with its venv active;
# a worktree of fa19767 at /tmp/fa19767: `git worktree add /tmp/fa19767 fa19767`)
set -euo pipefail
out=$(realpath "$1"); rounds=${2:-4}
head_tree=$(git rev-parse --show-toplevel)
mkdir -p "$out"
run() {  # name tree extra-args...
    local name=$1 tree=$2; shift 2
    (cd "$out" && PYTHONPATH="$tree" moe-lab train trainer.max_steps=120 threads=2 \
        hydra.run.dir="$out/$name" "$@" > "$out/$name.log" 2>&1)
    python - "$out/$name/metrics.csv" "$name" >> "$out/windows.csv" <<'PY'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    if row.get("train/tokens_per_sec") and int(row["step"]) > 40:
        print(f"{sys.argv[2]},{row['step']},{float(row['train/tokens_per_sec']):.1f}")
PY
}
echo "run,step,tokens_per_s" > "$out/windows.csv"
for r in $(seq 1 "$rounds"); do
    run "r${r}_fa19767_bf16" /tmp/fa19767 trainer.precision=bf16-mixed compile=true
    run "r${r}_head_default" "$head_tree"
done
python - "$out/windows.csv" <<'PY'
import csv, statistics, sys
by = {}
for row in csv.DictReader(open(sys.argv[1])):
    by.setdefault(row["run"], []).append(float(row["tokens_per_s"]))
rounds = sorted({run.split("_", 1)[0] for run in by})
for r in rounds:
    a, b = statistics.median(by[f"{r}_fa19767_bf16"]), statistics.median(by[f"{r}_head_default"])
    print(f"{r}: fa19767 bf16 compiled {a:8.0f}  today's default {b:8.0f} tokens/s  {b / a:.3f}x")
a = statistics.median([v for run, vs in by.items() if "fa19767" in run for v in vs])
b = statistics.median([v for run, vs in by.items() if "head" in run for v in vs])
print(f"pooled medians: {a:.0f} against {b:.0f} tokens/s, today's default {b / a:.3f}x fa19767's bf16 compiled path")
PY
