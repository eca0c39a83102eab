#!/usr/bin/env bash
# The default `moe-lab train` on this CPU against fa19767's, as the speed issue measured it: 2 threads, the default
# model, 120 steps, rounds interleaved, each run's tokens/s per logging window (every 10 steps) after step 40.
#   mode "default" (the default): against fa19767's default (float32 eager: its `precision=auto` chose bfloat16 on
#     AMX only); a third run per round, today's code with `trainer.precision=32-true`, checks that float32 eager
#     itself has not moved since fa19767.
#   mode "bf16": against fa19767's own bf16-mixed compiled path (`trainer.precision=bf16-mixed compile=true` there,
#     the row the issue measured at 1.87x on its host): has anything since fa19767 slowed that path?
#
# Usage: train_vs_fa19767.sh OUT_DIR ROUNDS [default|bf16]   (run from a worktree of the commit under test, with its
# venv active; a worktree of fa19767 at /tmp/fa19767: `git worktree add /tmp/fa19767 fa19767`)
set -euo pipefail
out=$(realpath "$1"); rounds=${2:-2}; mode=${3:-default}
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
    if [ "$mode" = bf16 ]; then
        run "r${r}_fa19767_bf16" /tmp/fa19767 trainer.precision=bf16-mixed compile=true
        run "r${r}_head_default" "$head_tree"
    else
        run "r${r}_fa19767_default" /tmp/fa19767
        run "r${r}_head_default" "$head_tree"
        run "r${r}_head_32true" "$head_tree" trainer.precision=32-true
    fi
done
python - "$out/windows.csv" <<'PY'
import csv, statistics, sys
by, rounds = {}, {}
for row in csv.DictReader(open(sys.argv[1])):
    r, name = row["run"].split("_", 1)
    by.setdefault(name, []).append(float(row["tokens_per_s"]))
    rounds.setdefault(r, {}).setdefault(name, []).append(float(row["tokens_per_s"]))
base_name = next(name for name in by if name.startswith("fa19767"))
for r, runs in rounds.items():
    base = statistics.median(runs[base_name])
    print(f"{r}: " + "  ".join(f"{n} {statistics.median(v):.0f} ({statistics.median(v) / base:.3f}x)" for n, v in runs.items()))
base = statistics.median(by[base_name])
for name, values in by.items():
    med = statistics.median(values)
    print(f"{name:18s} windows {len(values):2d}  median {med:8.0f} tokens/s  [{min(values):.0f}, {max(values):.0f}]"
          f"  {med / base:.3f}x {base_name}")
PY
