"""Finding 6's table: per MoE layer, the domain specialisation (I(expert; domain) / H(domain)) that `moe-lab analyze`
measured on each final checkpoint, mean [95% CI] over seeds, for the learned router and the domain oracle; the same
measure in the first logged training window (the router at initialisation, near step 10) and in the last; and each
domain's largest expert share against the uniform k/E.

    python summarise.py learned oracle -o summary.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moe_lab.analysis.runs import sweep_runs
from moe_lab.analysis.stats import mean_interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+")
    parser.add_argument("-o", "--output", default="summary.json")
    args = parser.parse_args()
    out = {}
    for sweep in args.sweeps:
        runs = [run for run in sweep_runs(Path(sweep)) if run.status == "finished"]
        reports = [json.loads((run.path / "analysis.json").read_text()) for run in runs]
        layers = list(reports[0]["layers"])
        k_over_e = reports[0]["uniform_share"]
        entry = {"runs": len(runs), "val_loss": mean_interval([run.final("val/loss") for run in runs]), "layers": {}}
        print(
            f"{sweep}: {len(runs)} seeds, val/loss {entry['val_loss']['mean']:.4f} "
            f"[{entry['val_loss']['low']:.4f}, {entry['val_loss']['high']:.4f}]"
        )
        print(
            f"  layer  at init (step ~10)       last training window    final checkpoint (analyze)   "
            f"largest domain share (k/E = {k_over_e:.2f})"
        )
        for layer in layers:
            first = mean_interval([run.series(f"moe/layer{layer}/specialization")[1][0] for run in runs])
            last = mean_interval([run.series(f"moe/layer{layer}/specialization")[1][-1] for run in runs])
            final = mean_interval([r["layers"][layer]["domain_specialisation"] for r in reports])
            top = mean_interval([float(np.max(r["layers"][layer]["domain_shares"])) for r in reports])
            entry["layers"][layer] = {"at_init": first, "last_window": last, "final": final, "largest_share": top}
            cell = lambda i: f"{i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}]"  # noqa: E731
            print(f"  {layer:>5}  {cell(first):<24} {cell(last):<23} {cell(final):<28} {cell(top)}")
        out[sweep] = entry
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
