"""Finding 7, language-model version: optimizer steps (= training tokens / 4,096) for the default MoE and for the dense
model of equal total size to reach validation-loss targets, from a sweep with seeds (finding 1's).

A run's steps to a target are interpolated linearly between the two validations around it; targets are the losses
every run of both configurations reaches. Mean and 95% interval over seeds, the ratio of means, and the difference
paired by seed (the sweep's seeds are paired: the same data order and shared weights under one seed), and the per-seed
ratio's geometric mean with the t interval of its logarithm.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from moe_lab.analysis.runs import sweep_runs
from moe_lab.analysis.seeds import seed_groups
from moe_lab.analysis.stats import mean_interval, paired_difference_interval, paired_ratio_interval

CONFIGS = {
    "model=tiny": "MoE, top-2 of 8 experts of width 384",
    "model=dense_tiny_total": "dense, FFN 3072 (the MoE's total parameters, all active)",
}
TARGETS = (2.2, 2.1, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.45, 1.4, 1.35)


def steps_to(run, target: float) -> float:
    steps, losses = run.series("val/loss")
    for (s0, l0), (s1, l1) in zip(zip(steps, losses), zip(steps[1:], losses[1:])):
        if l1 <= target < l0:
            return s0 + (l0 - target) / (l0 - l1) * (s1 - s0)
    return math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep")
    parser.add_argument("-o", "--output", default="lm_steps.json")
    args = parser.parse_args()
    groups = {g.name: g for g in seed_groups(sweep_runs(Path(args.sweep)))}
    chosen = {name: groups[name] for name in CONFIGS}
    worst = max(min(run.series("val/loss")[1]) for g in chosen.values() for run in g.finished)
    targets = [t for t in TARGETS if t > worst]
    out = {"targets": {}}
    print("optimizer steps (4,096 tokens each) to reach a validation loss; mean [95% CI] over seeds")
    print(f"  {'target':>6}  " + "  ".join(f"{name:>34}" for name in CONFIGS) + "  MoE / dense (means, paired, ratio)")
    for target in targets:
        values = {
            name: {seed: steps_to(run, target) for run, seed in zip(g.runs, g.seeds) if run.status == "finished"}
            for name, g in chosen.items()
        }
        seeds = sorted(set.intersection(*(set(v) for v in values.values())))
        values = {name: [v[seed] for seed in seeds] for name, v in values.items()}
        stats = {name: mean_interval(v) for name, v in values.items()}
        moe, dense = stats["model=tiny"], stats["model=dense_tiny_total"]
        d = paired_difference_interval(values["model=tiny"], values["model=dense_tiny_total"])
        ratio = paired_ratio_interval(values["model=tiny"], values["model=dense_tiny_total"])
        out["targets"][str(target)] = {
            "seeds": seeds,
            "steps": values,
            "moe_minus_dense": d,
            "ratio": moe["mean"] / dense["mean"],
            "paired_ratio": ratio,
        }
        print(
            f"  {target:>6}  "
            + "  ".join(f"{s['mean']:>17.1f} [{s['low']:>6.1f}, {s['high']:>6.1f}]" for s in stats.values())
            + f"  {moe['mean'] / dense['mean']:.2f}  paired {d['diff']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
            + f"  per-seed ratio {ratio['mean']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"
        )
    out["configs"] = CONFIGS
    out["final_val_loss"] = {name: mean_interval(g.values("val/loss")) for name, g in chosen.items()}
    Path(args.output).write_text(json.dumps(out, indent=2, default=lambda x: None if not np.isfinite(x) else x) + "\n")


if __name__ == "__main__":
    main()
