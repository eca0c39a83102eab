#!/usr/bin/env bash
# At equal average compute, does dynamic routing match or beat top-2? The default tiny model (8 experts, 4 MoE
# layers) with router=topk (top-2) against router=dtop_p (top-p with the threshold held by a PI controller at 2.0
# experts per token, cap 4), seeds 1-3 paired (the same batches and the same initial weights but the router's),
# STEPS optimizer steps each, interleaved seed by seed. Output: outputs/dynamic_compute/{seed}-{router}/;
# results/runs.csv and the summary printed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-outputs/dynamic_compute}
steps=${STEPS:-250}
for seed in 1 2 3; do
  for router in topk dtop_p; do
    [ -f $out/$seed-$router/summary.json ] || moe-lab train router=$router seed=$seed trainer.max_steps=$steps \
      trainer.val_check_interval=$steps trainer.log_every_n_steps=10 ${THREADS:+threads=$THREADS} \
      hydra.run.dir=$out/$seed-$router metrics.dashboard=false > /dev/null
  done
done
mkdir -p "$here/results"
python - "$out" "$here/results/runs.csv" <<'PY'
import csv, json, sys
from pathlib import Path
from moe_lab.analysis.stats import mean_interval, paired_difference_interval
out, table = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for seed in (1, 2, 3):
    for router in ("topk", "dtop_p"):
        run = out / f"{seed}-{router}"
        summary = json.loads((run / "summary.json").read_text())
        logged = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("moe/experts_per_token")]
        k = [float(r["moe/experts_per_token"]) for r in logged]
        rows.append({"seed": seed, "router": router, "val_loss": summary["val/loss"],
                     "experts_per_token_mean": sum(k) / len(k), "experts_per_token_last": k[-1],
                     "tokens_per_sec_run": summary["tokens_per_sec_run"]})
with open(table, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
by = {r: [x for x in rows if x["router"] == r] for r in ("topk", "dtop_p")}
for router, xs in by.items():
    m = mean_interval([x["val_loss"] for x in xs])
    k = mean_interval([x["experts_per_token_mean"] for x in xs])
    print(f"{router:>7}: val/loss {m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]; experts per token over training "
          f"{k['mean']:.3f} [{k['low']:.3f}, {k['high']:.3f}]")
d = paired_difference_interval([x["val_loss"] for x in by["dtop_p"]], [x["val_loss"] for x in by["topk"]])
print(f"dtop_p - topk, paired by seed: {d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], p = {d['p']:.3f}")
PY
