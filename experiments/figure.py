"""The figure of a finding: its configurations over seeds (moe-lab's sweep-page figures: means with 95% intervals
and every seed, and the mean validation curve with its band), as a PNG for the finding's README.

    python experiments/figure.py SWEEP_OR_RUN [...] -o figure.png [--metric moe/mean_imbalance]

Needs headless Chromium (apt-get install chromium) to draw the page into a PNG.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from moe_lab.analysis import figures
from moe_lab.analysis.runs import gather_runs
from moe_lab.analysis.seeds import ranked_groups, seed_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        help="a second panel's metric (default: moe/mean_imbalance); repeat for more",
    )
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument(
        "--label",
        nargs=2,
        action="append",
        default=[],
        metavar=("GROUP", "TEXT"),
        help="draw the configuration GROUP (its name as the dashboard prints it) as TEXT; repeat for more",
    )
    args = parser.parse_args()
    labels = dict(args.label)
    ranked = ranked_groups(seed_groups(gather_runs([Path(p) for p in args.paths])))
    import plotly.graph_objects as go

    metrics = [("val/loss", "final val/loss (95% CI, seeds)")] + [
        (m, m) for m in (args.metric or ["moe/mean_imbalance"])
    ]
    fig = figures._subplots(
        1,
        len(metrics) + 1,
        [t for _, t in metrics] + ["val/loss over training"],
        height=120 + 60 * len(ranked) + 120,
        horizontal_spacing=0.12,
    )
    names = [f"#{r.rank_text} {labels.get(r.group.name, r.group.name)}" for r in ranked]
    for j, (key, _) in enumerate(metrics):
        intervals = [r.group.interval(key) for r in ranked]
        fig.add_trace(
            go.Scatter(
                y=names,
                x=[i["mean"] for i in intervals],
                mode="markers",
                showlegend=False,
                marker=dict(size=11, color=[figures.PALETTE[k % len(figures.PALETTE)] for k in range(len(ranked))]),
                error_x=dict(
                    type="data", array=[i["half"] if i["half"] == i["half"] else 0 for i in intervals], thickness=2
                ),
            ),
            row=1,
            col=j + 1,
        )
        fig.add_trace(
            go.Scatter(
                y=[n for r, n in zip(ranked, names) for _ in r.group.values(key)],
                x=[v for r in ranked for v in r.group.values(key)],
                mode="markers",
                showlegend=False,
                marker=dict(color="#222", size=6, symbol="circle-open"),
            ),
            row=1,
            col=j + 1,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=j + 1, showticklabels=j == 0)
    curves = figures.group_curves(ranked)
    shown = []
    for trace in curves.data:
        if trace.xaxis in (None, "x") and trace.yaxis in (None, "y"):  # the validation-loss panel
            trace.showlegend = False
            fig.add_trace(trace, row=1, col=len(metrics) + 1)
            shown += [(x, y) for x, y in zip(trace.x, trace.y) if x and x > 0 and y is not None]
    if shown:  # from the first validation after step 0 on: the untrained model's loss would flatten the rest
        xs, ys = [x for x, _ in shown], [y for _, y in shown]
        pad = 0.05 * (max(ys) - min(ys))
        fig.update_yaxes(range=[min(ys) - pad, max(ys) + pad], row=1, col=len(metrics) + 1)
        fig.update_xaxes(range=[0.8 * min(xs), 1.02 * max(xs)], row=1, col=len(metrics) + 1)
    fig.update_xaxes(title_text="optimizer step", row=1, col=len(metrics) + 1)
    fig.update_layout(margin=dict(l=220, r=20, t=50, b=50))
    write_png(fig, Path(args.output), args.width)


def write_png(fig, out: Path, width: int) -> None:
    """A plotly figure as a PNG, drawn by headless Chromium."""
    html = Path(tempfile.mkdtemp()) / "figure.html"
    fig.update_layout(width=width)
    fig.write_html(html, include_plotlyjs=True, full_html=True, config={"displayModeBar": False})
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("writing a PNG needs headless Chromium (apt-get install chromium)")
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width + 20},{fig.layout.height + 20}",
            "--virtual-time-budget=10000",
            f"--screenshot={out.resolve()}",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
