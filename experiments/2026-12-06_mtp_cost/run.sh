#!/usr/bin/env bash
# What multi-token prediction (model.mtp_depth=1, DeepSeek-V3's one module, loss weight 0.3) costs in tokens/s and
# gives in validation loss on the default tiny model, 200 steps, seeds 1-3; runs A (no MTP) and B (MTP) interleaved
# seed by seed so that the machine's drift falls on both. Seeds pair: a seed gives both the same batches and the same
# main-model weights (the MTP module draws from a stream of its own). Output: outputs/mtp_cost/{seed}-{depth}/.
set -euo pipefail
out=${OUT:-outputs/mtp_cost}
for seed in 1 2 3; do
  for depth in 0 1; do
    moe-lab train seed=$seed model.mtp_depth=$depth trainer.max_steps=200 trainer.val_check_interval=200 \
      hydra.run.dir=$out/$seed-$depth metrics.dashboard=false > /dev/null
  done
done
python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for seed in (1, 2, 3):
    a, b = (json.loads((out / f"{seed}-{d}" / "summary.json").read_text()) for d in (0, 1))
    rows.append((seed, a["val/loss"], b["val/loss"], a["tokens_per_sec_run"], b["tokens_per_sec_run"]))
    print(f"seed {seed}: val/loss {a['val/loss']:.4f} -> {b['val/loss']:.4f}, tokens/s {a['tokens_per_sec_run']:.0f} -> {b['tokens_per_sec_run']:.0f}")
ratios = [r[4] / r[3] for r in rows]
deltas = [r[2] - r[1] for r in rows]
print(f"tokens/s ratio (MTP / none): mean {statistics.mean(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
print(f"val/loss difference (MTP - none): mean {statistics.mean(deltas):+.4f}, min {min(deltas):+.4f}, max {max(deltas):+.4f}")
PY
