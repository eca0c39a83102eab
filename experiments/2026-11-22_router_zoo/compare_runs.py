"""Gather a router comparison from run directories: final val/loss and max/mean expert load per MoE layer."""
import csv, json, sys
from pathlib import Path

rows = []
for d in map(Path, sys.argv[1:]):
    summary = json.loads((d / "summary.json").read_text())
    overrides = [l[2:].strip() for l in (d / ".hydra" / "overrides.yaml").read_text().splitlines()]
    metrics = [r for r in csv.DictReader(open(d / "metrics.csv")) if r.get("train/loss")]
    last = metrics[-1]
    imb = [float(v) for k, v in last.items() if k.endswith("/imbalance") and v]
    drop = [float(v) for k, v in last.items() if k.endswith("/dropped_frac") and v]
    name = " ".join(o for o in overrides if not o.startswith(("trainer.", "hydra."))) or "defaults"
    rows.append((name, summary["val/loss"], sum(imb) / len(imb) if imb else float("nan"),
                 max(imb) if imb else float("nan"), sum(drop) / len(drop) if drop else float("nan"),
                 summary["train/tokens_per_sec"]))
print("| run | val/loss | max/mean load (mean over layers) | worst layer | dropped | tokens/s |")
print("|---|---|---|---|---|---|")
for name, vl, mi, wi, dr, tps in sorted(rows, key=lambda r: r[1]):
    print(f"| `{name}` | {vl:.4f} | {mi:.2f} | {wi:.2f} | {dr:.1%} | {tps/1e3:.1f}k |")
