"""`moe-lab dashboard PATH [-o report.html] [--live]`: one self-contained HTML page for a run or a sweep.

A run page shows the loss curves, each MoE layer's expert load over time, balance, drops, entropy and
specialisation curves, and which experts take which data domain. A sweep page puts the runs side by side: a table of
final metrics sorted by validation loss with each run's overrides, bars of loss, balance and specialisation, curves
overlaid, and each run's expert x domain table. Plotly's JavaScript and all data are inlined: the page opens with
no network.
"""

from __future__ import annotations

import html
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np

from moe_lab.config import UserError
from moe_lab.sweep import RunRecord, is_run_dir, is_sweep_dir, label, read_run, summary_rows, sweep_runs, swept_keys

GENERATOR = '<meta name="generator" content="moe-lab dashboard">'
PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D",
           "#BAB0AC"]
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


class DashboardError(UserError):
    pass


# ------------------------------------------------------------------------------------------------------------
# Data helpers


def moe_layers(run: RunRecord) -> list[int]:
    if run.routing:
        return [layer["layer"] for layer in run.routing[-1]["layers"]]
    keys = {k for row in run.metrics for k in row if k.startswith("moe/layer") and k.endswith("/imbalance")}
    return sorted(int(k.split("/")[1][5:]) for k in keys)


def load_over_time(run: RunRecord, layer: int) -> tuple[list[int], np.ndarray]:
    """(steps, loads (experts, steps)) of one layer."""
    steps, loads = [], []
    for record in run.routing:
        for entry in record["layers"]:
            if entry["layer"] == layer:
                steps.append(record["step"])
                loads.append(entry["load"])
    return steps, np.asarray(loads).T if loads else np.zeros((0, 0))


def domain_table(run: RunRecord, layer: int, tail: float = 0.25) -> Optional[np.ndarray]:
    """(experts, domains) routing counts of one layer, summed over the last `tail` of the logged windows."""
    records = [r for r in run.routing if any("domain_counts" in e for e in r["layers"])]
    if not records:
        return None
    keep = records[-max(1, int(math.ceil(len(records) * tail))):]
    total = None
    for record in keep:
        for entry in record["layers"]:
            if entry["layer"] == layer and "domain_counts" in entry:
                counts = np.asarray(entry["domain_counts"], dtype=float)
                total = counts if total is None else total + counts
    return total


def domains_of(run: RunRecord) -> list[str]:
    return run.routing[-1].get("domains", []) if run.routing else []


# ------------------------------------------------------------------------------------------------------------
# Figures


def _figure(**layout):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=40, b=50), height=360,
                      font=dict(family="-apple-system, Segoe UI, Helvetica, Arial, sans-serif", size=12),
                      legend=dict(orientation="h", y=-0.2), **layout)
    return fig


def _subplots(rows: int, cols: int, titles: list[str], height: int, **kwargs):
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, **kwargs)
    fig.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=50, b=40), height=height,
                      font=dict(family="-apple-system, Segoe UI, Helvetica, Arial, sans-serif", size=12),
                      legend=dict(orientation="h", y=-0.08))
    return fig


def loss_figure(run: RunRecord):
    import plotly.graph_objects as go

    fig = _figure(title="Loss (nats per token)", xaxis_title="optimizer step", yaxis_title="cross-entropy")
    steps, values = run.series("train/loss")
    fig.add_trace(go.Scatter(x=steps, y=values, name="train", line=dict(color=PALETTE[0])))
    steps, values = run.series("val/loss")
    fig.add_trace(go.Scatter(x=steps, y=values, name="validation", mode="lines+markers",
                             line=dict(color=PALETTE[1], width=3)))
    domain_keys = sorted({k for row in run.metrics for k in row if k.startswith("val/loss/")})
    for i, key in enumerate(domain_keys):
        steps, values = run.series(key)
        fig.add_trace(go.Scatter(x=steps, y=values, name=f"validation: {key.split('/')[-1]}", mode="lines",
                                 line=dict(dash="dot", color=PALETTE[(i + 2) % len(PALETTE)])))
    return fig


def load_heatmaps(run: RunRecord):
    import plotly.graph_objects as go

    layers = moe_layers(run)
    if not layers:
        return None
    fig = _subplots(len(layers), 1, [f"layer {layer}" for layer in layers], height=110 + 150 * len(layers),
                    shared_xaxes=True, vertical_spacing=0.25 / len(layers))
    for i, layer in enumerate(layers):
        steps, loads = load_over_time(run, layer)
        if loads.size == 0:
            continue
        num_experts = loads.shape[0]
        fig.add_trace(go.Heatmap(
            z=loads, x=steps, y=[f"E{e}" for e in range(num_experts)], zmin=0, zmax=2.0 / num_experts,
            colorscale="Viridis", showscale=i == 0,
            colorbar=dict(title="share of<br>tokens", tickformat=".0%"),
            hovertemplate="step %{x}<br>expert %{y}<br>load %{z:.1%}<extra></extra>"), row=i + 1, col=1)
    fig.update_xaxes(title_text="optimizer step", row=len(layers), col=1)
    return fig


def balance_figure(run: RunRecord):
    import plotly.graph_objects as go

    layers = moe_layers(run)
    if not layers:
        return None
    panels = [("imbalance", "max load / mean load (1 = balanced)"), ("dropped_frac", "dropped token slots"),
              ("entropy_norm", "router entropy / log E"), ("specialization", "specialisation: I(expert; domain)/H(domain)")]
    fig = _subplots(2, 2, [title for _, title in panels], height=620, vertical_spacing=0.16)
    for i, layer in enumerate(layers):
        color = PALETTE[i % len(PALETTE)]
        for j, (key, _) in enumerate(panels):
            steps, values = run.series(f"moe/layer{layer}/{key}")
            fig.add_trace(go.Scatter(x=steps, y=values, name=f"layer {layer}", legendgroup=f"layer{layer}",
                                     showlegend=j == 0, line=dict(color=color)), row=j // 2 + 1, col=j % 2 + 1)
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    return fig


def domain_figure(run: RunRecord, layers: Optional[list[int]] = None, name: str = ""):
    """Per layer: p(expert | domain), the share of each domain's tokens that each expert takes."""
    import plotly.graph_objects as go

    domains = domains_of(run)
    layers = layers if layers is not None else moe_layers(run)
    tables = [(layer, domain_table(run, layer)) for layer in layers]
    tables = [(layer, t) for layer, t in tables if t is not None]
    if not tables or len(domains) < 2:
        return None
    titles = []
    for layer, t in tables:
        from moe_lab.observe import mutual_information

        titles.append(f"{name + ': ' if name else ''}layer {layer}, specialisation {mutual_information(t)[1]:.2f}")
    cols = min(len(tables), 2)
    rows = math.ceil(len(tables) / cols)
    fig = _subplots(rows, cols, titles, height=90 + 60 * len(domains) * rows + 90 * rows, vertical_spacing=0.3 / rows)
    for i, (_layer, table) in enumerate(tables):
        share_DE = (table / np.maximum(table.sum(0, keepdims=True), 1)).T  # p(expert | domain)
        num_experts = share_DE.shape[1]
        fig.add_trace(go.Heatmap(
            z=share_DE, x=[f"E{e}" for e in range(num_experts)], y=domains, zmin=0, zmax=min(1.0, 3.0 / num_experts),
            colorscale="Blues", showscale=i == 0, colorbar=dict(title="share of the<br>domain's tokens", tickformat=".0%"),
            text=np.round(share_DE * 100).astype(int).astype(str) if num_experts <= 16 else None,
            texttemplate="%{text}%" if num_experts <= 16 else None,
            hovertemplate="domain %{y}<br>expert %{x}<br>%{z:.1%} of the domain's tokens<extra></extra>"),
            row=i // cols + 1, col=i % cols + 1)
    return fig


def throughput_figure(run: RunRecord):
    import plotly.graph_objects as go

    steps, values = run.series("train/tokens_per_sec")
    if not steps:
        return None
    fig = _figure(title="Throughput", xaxis_title="optimizer step", yaxis_title="tokens / s (all devices)")
    fig.add_trace(go.Scatter(x=steps, y=values, name="tokens/s", line=dict(color=PALETTE[4])))
    steps, values = run.series("train/mfu")
    if steps:
        fig.add_trace(go.Scatter(x=steps, y=[100 * v for v in values], name="MFU %", yaxis="y2",
                                 line=dict(color=PALETTE[5])))
        fig.update_layout(yaxis2=dict(title="MFU %", overlaying="y", side="right"))
    return fig


# ------------------------------------------------------------------------------------------------------------
# Sweep figures


def sweep_bars(runs: list[RunRecord], labels: list[str]):
    import plotly.graph_objects as go

    panels = [("val/loss", "final validation loss (lower is better)"),
              ("moe/mean_imbalance", "mean max/mean load over layers (1 = balanced)"),
              ("moe/specialization", "specialisation (0-1)")]
    fig = _subplots(1, 3, [t for _, t in panels], height=120 + 34 * len(runs) + 120, horizontal_spacing=0.16)
    for j, (key, _) in enumerate(panels):
        values = [run.final(key) for run in runs]
        fig.add_trace(go.Bar(y=labels, x=[v if v is not None else 0 for v in values], orientation="h",
                             marker_color=[PALETTE[i % len(PALETTE)] for i in range(len(runs))], showlegend=False,
                             text=[f"{v:.3f}" if v is not None else "n/a" for v in values], textposition="auto",
                             hovertemplate="%{y}<br>%{x:.4f}<extra></extra>"), row=1, col=j + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(showticklabels=False, col=2)
    fig.update_yaxes(showticklabels=False, col=3)
    return fig


def sweep_curves(runs: list[RunRecord], labels: list[str]):
    import plotly.graph_objects as go

    panels = [("val/loss", "validation loss"), ("train/loss", "training loss"),
              ("moe/max_imbalance", "worst layer's max/mean load"), ("moe/dropped_frac", "dropped token slots")]
    fig = _subplots(2, 2, [t for _, t in panels], height=640, vertical_spacing=0.16)
    for i, (run, name) in enumerate(zip(runs, labels)):
        color = PALETTE[i % len(PALETTE)]
        for j, (key, _) in enumerate(panels):
            steps, values = run.series(key)
            fig.add_trace(go.Scatter(x=steps, y=values, name=name, legendgroup=name, showlegend=j == 0,
                                     mode="lines+markers" if key == "val/loss" else "lines", line=dict(color=color)),
                          row=j // 2 + 1, col=j % 2 + 1)
    fig.update_yaxes(tickformat=".0%", row=2, col=2)
    return fig


# ------------------------------------------------------------------------------------------------------------
# Pages

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0; background: #f5f6f8;
       color: #1f2933; }
header { background: #1f2933; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header p { margin: 4px 0 0; color: #cbd2d9; font-size: 13px; }
main { padding: 16px 32px 48px; max-width: 1400px; margin: 0 auto; }
section { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08); margin: 16px 0;
          padding: 16px 20px; }
section h2 { margin: 0 0 4px; font-size: 17px; }
section p.how { margin: 0 0 8px; color: #52606d; font-size: 13px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; }
.card { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08); padding: 12px 16px; }
.card .value { font-size: 24px; font-weight: 600; }
.card .name { color: #52606d; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .sub { color: #7b8794; font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 6px 8px; border-bottom: 1px solid #e4e7eb; text-align: right; white-space: nowrap; }
th { background: #f5f7fa; position: sticky; top: 0; }
td.text, th.text { text-align: left; white-space: normal; }
tr.best td { background: #e3f9e5; }
td.good { color: #207227; font-weight: 600; }
td.failed { color: #cf1124; }
code { background: #f0f4f8; padding: 1px 4px; border-radius: 3px; white-space: normal; word-break: break-word; }
header code { background: #323f4b; color: #e4e7eb; }
td.overrides { min-width: 120px; max-width: 420px; }
details summary { cursor: pointer; color: #52606d; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
@media (max-width: 1000px) { .grid2 { grid-template-columns: 1fr; } }
"""


def _page(title: str, subtitle: str, body: str, refresh: Optional[int]) -> str:
    from plotly.offline import get_plotlyjs

    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{GENERATOR}{meta}"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style>"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p>{subtitle}</p></header><main>{body}</main></body></html>")


def _plot(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG) if fig is not None else ""


def _section(title: str, how: str, content: str) -> str:
    if not content:
        return ""
    return f"<section><h2>{html.escape(title)}</h2><p class=\"how\">{how}</p>{content}</section>"


def _card(name: str, value: str, sub: str = "") -> str:
    return (f'<div class="card"><div class="name">{html.escape(name)}</div><div class="value">{value}</div>'
            f'<div class="sub">{sub}</div></div>')


def _fmt(value: Optional[float], spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def run_page(run: RunRecord, refresh: Optional[int] = None) -> str:
    s = run.summary
    overrides = " ".join(run.overrides) or "defaults"
    params = s.get("params", {})
    tokens_per_sec = run.series("train/tokens_per_sec")[1]
    cards = "".join([
        _card("validation loss", _fmt(run.final("val/loss")), f"untrained: {_fmt(s.get('initial_val_loss'))}"),
        _card("training loss", _fmt(run.final("train/loss")), f"step {s.get('step', run.series('train/loss')[0][-1:] or '?')}"),
        _card("tokens / s", _fmt(float(np.median(tokens_per_sec)) if tokens_per_sec else None, ",.0f"),
              f"MFU {_fmt(100 * run.final('train/mfu'), '.1f')}%" if run.final("train/mfu") else "median over windows"),
        _card("worst layer imbalance", _fmt(run.final("moe/max_imbalance"), ".2f"),
              f"mean over layers {_fmt(run.final('moe/mean_imbalance'), '.2f')}"),
        _card("dropped slots", _fmt(run.final("moe/dropped_frac"), ".1%"),
              f"dead experts: {_fmt(run.final('moe/dead_experts'), '.0f')}"),
        _card("specialisation", _fmt(run.final("moe/specialization"), ".3f"), "I(expert; domain) / H(domain)"),
        _card("parameters", f"{params.get('total', 0) / 1e6:.1f}M" if params else "n/a",
              f"{params.get('active', 0) / 1e6:.1f}M active per token" if params else ""),
    ])
    body = f'<div class="cards">{cards}</div>'
    body += _section("Loss", "Training loss is averaged over each logging window; validation runs on held-out "
                     "blocks of every domain (dotted: per domain).", _plot(loss_figure(run)))
    body += _section("Expert load over time", "Each row is an expert, each column a logging window; colour is the "
                     "share of the layer's routed token slots the expert took. Mid-scale is the fair share 1/E; "
                     "yellow rows hog tokens, dark rows starve (a black row is a dead expert).",
                     _plot(load_heatmaps(run)))
    body += _section("Balance, drops, entropy and specialisation", "Per MoE layer. Imbalance = max load / mean "
                     "load; dropped = token slots past the capacity limit; entropy near 1 = the router is unsure; "
                     "specialisation = mutual information between expert and data domain over the domain's entropy.",
                     _plot(balance_figure(run)))
    body += _section("Which experts take which domain", "For each data domain (rows), the share of its tokens each "
                     "expert (columns) takes, over the last quarter of training. A bright cell only in one row is an "
                     "expert specialised in that domain.", _plot(domain_figure(run)))
    body += _section("Throughput", "Tokens per second over all devices, validation time excluded; MFU on GPUs "
                     "whose peak FLOP/s moe-lab knows.", _plot(throughput_figure(run)))
    subtitle = (f"{html.escape(str(run.path))} &middot; {run.status} &middot; overrides: <code>"
                f"{html.escape(overrides)}</code> &middot; generated {datetime.now():%Y-%m-%d %H:%M}")
    return _page(f"moe-lab run: {overrides}", subtitle, body, refresh)


def sweep_page(sweep_dir: Path, runs: list[RunRecord], refresh: Optional[int] = None) -> str:
    keys = swept_keys(runs)
    labels = [label(run, keys) for run in runs]
    by_label = {run.job: name for run, name in zip(runs, labels)}
    rows = summary_rows(runs)
    done = [r for r in rows if isinstance(r["val/loss"], float)]
    best_loss = done[0]["job"] if done else None
    balanced = [r for r in done if isinstance(r["moe/mean_imbalance"], float)]
    best_balance = min(balanced, key=lambda r: r["moe/mean_imbalance"])["job"] if balanced else None
    special = [r for r in done if isinstance(r["moe/specialization"], float)]
    most_special = max(special, key=lambda r: r["moe/specialization"])["job"] if special else None

    cards = "".join([
        _card("runs", str(len(runs)), f"{sum(r['status'] == 'finished' for r in rows)} finished, "
                                      f"{sum(r['status'] == 'failed' for r in rows)} failed"),
        _card("best validation loss", _fmt(done[0]["val/loss"]) if done else "n/a",
              html.escape(by_label.get(best_loss, ""))),
        _card("best balanced", _fmt(min(r["moe/mean_imbalance"] for r in balanced) if balanced else None, ".2f"),
              html.escape(by_label.get(best_balance, ""))),
        _card("most specialised", _fmt(max(r["moe/specialization"] for r in special) if special else None, ".3f"),
              html.escape(by_label.get(most_special, ""))),
    ])
    columns = [("val/loss", ".4f"), ("initial_val_loss", ".3f"), ("moe/mean_imbalance", ".2f"),
               ("moe/max_imbalance", ".2f"), ("moe/dropped_frac", ".1%"), ("moe/dead_experts", ".0f"),
               ("moe/specialization", ".3f"), ("train/tokens_per_sec", ",.0f")]
    head = "".join(f"<th>{h}</th>" for h in ["#", "job"]) + '<th class="text">run</th>' + "".join(
        f"<th>{html.escape(c)}</th>" for c, _ in columns) + '<th>status</th><th class="text">overrides</th><th>page</th>'
    body_rows = []
    for rank, r in enumerate(rows, 1):
        cells = []
        for c, spec in columns:
            value = r[c]
            good = (c == "moe/mean_imbalance" and r["job"] == best_balance) or (c == "val/loss" and r["job"] == best_loss)
            cells.append(f'<td class="{"good" if good else ""}">{_fmt(value, spec) if value != "" else "n/a"}</td>')
        status = r["status"]
        run = next(x for x in runs if x.job == r["job"])
        status_cell = (f'<td class="failed" title="{html.escape(run.error)}">{status}</td>' if status == "failed"
                       else f"<td>{status}</td>")
        page = (f'<a href="{html.escape(r["job"])}/dashboard.html">open</a>'
                if (run.path / "dashboard.html").exists() else "")
        body_rows.append(f'<tr class="{"best" if r["job"] == best_loss else ""}"><td>{rank}</td><td>{r["job"]}</td>'
                         f'<td class="text">{html.escape(by_label[r["job"]])}</td>{"".join(cells)}{status_cell}'
                         f'<td class="text overrides"><details><summary>{len(r["overrides"].split())} overrides'
                         f'</summary><code>{html.escape(r["overrides"])}</code></details></td><td>{page}</td></tr>')
    table = f'<div style="overflow-x:auto"><table><tr>{head}</tr>{"".join(body_rows)}</table></div>'

    body = f'<div class="cards">{cards}</div>'
    body += _section("Runs, best validation loss first", "Final metrics of each run (green: best loss and best "
                     "balance). Imbalance = max load / mean load of a layer's experts (1 = balanced); specialisation = "
                     "mutual information between expert and data domain over the domain's entropy (0-1). The same "
                     "table is in sweep_summary.csv.", table)
    body += _section("Side by side", "Which configuration balanced its experts best: the middle panel (shorter "
                     "is better).", _plot(sweep_bars(runs, labels)))
    body += _section("Curves", "All runs overlaid: loss, the worst layer's imbalance and the dropped share over "
                     "training.", _plot(sweep_curves(runs, labels)))
    domain_parts = []
    for run, name in zip(runs, labels):
        layers = moe_layers(run)
        if not layers or not run.routing:
            continue
        from moe_lab.observe import mutual_information

        scored = [(mutual_information(t)[1], layer) for layer in layers
                  if (t := domain_table(run, layer)) is not None]
        if not scored:
            continue
        top_layer = max(scored)[1]
        fig = domain_figure(run, [top_layer], name=name)
        if fig is not None:
            fig.update_layout(height=220 + 40 * len(domains_of(run)))
            domain_parts.append(f"<div>{_plot(fig)}</div>")
    if domain_parts:
        body += _section("Which experts specialised in which domain", "For each run, its most specialised layer: the "
                         "share of each domain's tokens (rows) that each expert (columns) takes, over the last quarter "
                         "of training. Per-layer tables are in each run's own page.",
                         f'<div class="grid2">{"".join(domain_parts)}</div>')
    axes = ", ".join(f"<code>{html.escape(k)}</code>" for k in keys) or "none"
    subtitle = (f"{html.escape(str(sweep_dir))} &middot; swept: {axes} &middot; generated "
                f"{datetime.now():%Y-%m-%d %H:%M}")
    return _page(f"moe-lab sweep: {sweep_dir.name}", subtitle, body, refresh)


# ------------------------------------------------------------------------------------------------------------
# Writing


def write_dashboard(path: Path | str, out: Optional[Path | str] = None, refresh: Optional[int] = None) -> Path:
    """Write the dashboard of a run or sweep directory; returns the file written."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DashboardError(f"{path}: no such directory (give a run directory such as outputs/DATE/TIME, or a "
                             "sweep directory such as outputs/multirun/DATE/TIME)")
    out = Path(out).expanduser() if out is not None else path / "dashboard.html"
    if out.exists() and GENERATOR not in out.read_text(errors="ignore")[:20000]:
        raise DashboardError(f"{out} exists and was not written by moe-lab dashboard; moe-lab never writes over "
                             "files: choose another path with -o")
    if is_run_dir(path) and (path / "metrics.csv").exists():
        page = run_page(read_run(path), refresh)
    elif is_sweep_dir(path):
        runs = sweep_runs(path)
        if not runs:
            raise DashboardError(f"{path} holds no runs yet")
        page = sweep_page(path, runs, refresh)
    else:
        raise DashboardError(f"{path} is neither a run directory (with metrics.csv) nor a sweep directory "
                             "(with job directories 0/, 1/, ...)")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # atomic: a browser refreshing a live page never reads half a file
    return out


def live(path: Path, out: Optional[Path], interval: int) -> None:  # pragma: no cover - runs until Ctrl-C
    """Rewrite the dashboard every `interval` seconds; the page reloads itself as often."""
    target = None
    try:
        while True:
            try:
                target = write_dashboard(path, out, refresh=interval)
                print(f"\rmoe-lab: dashboard {target} updated {datetime.now():%H:%M:%S} (Ctrl-C to stop)",
                      end="", flush=True)
            except DashboardError as e:
                print(f"\rmoe-lab: waiting: {e}", end="", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        if target is not None:
            write_dashboard(path, out)  # a final page that no longer reloads
        print()
