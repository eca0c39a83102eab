"""The finding's figure: experts per token over training for each router (every seed, the controllers at work),
and the final val/loss of each seed against top-2's.

    python experiments/2026-12-06_null_and_relu_routing/figure.py OUT_DIR -o figure.png

OUT_DIR is run.sh's output folder (outputs/null_relu): runs {seed}-{router}/metrics.csv and summary.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from figure import write_png  # noqa: E402  (experiments/figure.py)

from moe_lab.analysis import figures  # noqa: E402

ROUTERS = {
    "topk": "top-2",
    "identity_experts": "identity experts, target 2 (LongCat-Flash)",
    "null_experts": "null experts, top-3 of 8 + 4 (AdaMoE)",
    "relu": "ReLU routing, k = 2 (ReMoE)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    import plotly.graph_objects as go

    fig = figures._subplots(
        1, 2, ["experts per token over training (every seed)", "final val/loss by seed"], height=420
    )
    for i, (router, label) in enumerate(ROUTERS.items()):
        color = figures.PALETTE[i % len(figures.PALETTE)]
        losses = []
        for seed in (1, 2, 3):
            run = args.out_dir / f"{seed}-{router}"
            rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("moe/experts_per_token")]
            fig.add_trace(
                go.Scatter(
                    x=[int(r["step"]) for r in rows],
                    y=[float(r["moe/experts_per_token"]) for r in rows],
                    mode="lines",
                    line=dict(color=color, width=1.5),
                    name=label,
                    legendgroup=router,
                    showlegend=seed == 1,
                ),
                row=1,
                col=1,
            )
            losses.append(json.loads((run / "summary.json").read_text())["val/loss"])
        fig.add_trace(
            go.Scatter(
                x=[1, 2, 3],
                y=losses,
                mode="markers+lines",
                marker=dict(color=color, size=9),
                line=dict(color=color, dash="dot"),
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="optimizer step", row=1, col=1)
    fig.update_yaxes(title_text="experts per token", row=1, col=1)
    fig.update_xaxes(title_text="seed", dtick=1, row=1, col=2)
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    write_png(fig, args.output, 1100)


if __name__ == "__main__":
    main()
