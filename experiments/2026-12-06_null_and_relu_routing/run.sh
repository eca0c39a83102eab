#!/usr/bin/env bash
# At equal average compute, do null experts (AdaMoE), identity experts with LongCat-Flash's bias controller, or
# ReLU routing (ReMoE) match or beat top-2? The default tiny model (8 experts, 4 MoE layers), seeds 1-3 paired (the
# same batches and the same initial weights but the router's), STEPS optimizer steps each, interleaved seed by seed.
# Output: outputs/null_relu/{seed}-{router}/; results/runs.csv and the summary printed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-outputs/null_relu}
steps=${STEPS:-250}
routers="topk identity_experts null_experts relu"
for seed in 1 2 3; do
  for router in $routers; do
    [ -f $out/$seed-$router/summary.json ] || moe-lab train router=$router seed=$seed trainer.max_steps=$steps \
      trainer.val_check_interval=$steps trainer.log_every_n_steps=10 ${THREADS:+threads=$THREADS} \
      hydra.run.dir=$out/$seed-$router metrics.dashboard=false > /dev/null
  done
done
mkdir -p "$here/results"
python - "$out" "$here/results/runs.csv" $routers <<'PY'
import csv, json, sys
from pathlib import Path
from moe_lab.analysis.stats import mean_interval, paired_difference_interval
out, table, routers = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rows = []
for seed in (1, 2, 3):
    for router in routers:
        run = out / f"{seed}-{router}"
        summary = json.loads((run / "summary.json").read_text())
        logged = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("moe/experts_per_token")]
        k = [float(r["moe/experts_per_token"]) for r in logged]
        rows.append({"seed": seed, "router": router, "val_loss": summary["val/loss"],
                     "experts_per_token_mean": sum(k) / len(k), "experts_per_token_last": k[-1],
                     "experts_per_token_min": min(k), "experts_per_token_max": max(k)})
with open(table, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
by = {r: [x for x in rows if x["router"] == r] for r in routers}
for router, xs in by.items():
    m = mean_interval([x["val_loss"] for x in xs])
    k = mean_interval([x["experts_per_token_mean"] for x in xs])
    print(f"{router:>17}: val/loss {m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]; experts per token over "
          f"training {k['mean']:.3f} [{k['low']:.3f}, {k['high']:.3f}]")
for router in routers[1:]:
    d = paired_difference_interval([x["val_loss"] for x in by[router]], [x["val_loss"] for x in by["topk"]])
    print(f"{router} - topk, paired by seed: {d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], p = {d['p']:.3f}")
PY
