"""The dashboards' figures (plotly) and the run data they draw: loss curves, expert load over time, balance, drops,
entropy and specialisation per layer, expert x domain tables, throughput, and the side-by-side sweep figures."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from moe_lab.analysis.runs import RunRecord
from moe_lab.analysis.stats import mutual_information

PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D", "#BAB0AC"]
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


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
    keep = records[-max(1, int(math.ceil(len(records) * tail))) :]
    total = None
    for record in keep:
        for entry in record["layers"]:
            if entry["layer"] == layer and "domain_counts" in entry:
                counts = np.asarray(entry["domain_counts"], dtype=float)
                total = counts if total is None else total + counts
    return total


def domains_of(run: RunRecord) -> list[str]:
    return run.routing[-1].get("domains", []) if run.routing else []


def wrap(text: str, width: int) -> list[str]:
    """`text` in lines of about `width` characters, broken after the commas and spaces between overrides."""
    lines, line = [], ""
    for word in text.replace(", ", ", \0").replace(" ", " \0").split("\0"):
        if line and len(line) + len(word) > width:
            lines.append(line.rstrip())
            line = ""
        line += word
    return lines + [line.rstrip()] if line else lines


# ------------------------------------------------------------------------------------------------------------
# Figures


def _figure(**layout):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(
        template="plotly_white",
        margin=dict(l=60, r=20, t=40, b=50),
        height=360,
        font=dict(family="-apple-system, Segoe UI, Helvetica, Arial, sans-serif", size=12),
        legend=dict(orientation="h", y=-0.2),
        **layout,
    )
    return fig


def _subplots(rows: int, cols: int, titles: list[str], height: int, **kwargs):
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, **kwargs)
    fig.update_layout(
        template="plotly_white",
        margin=dict(l=60, r=20, t=50, b=40),
        height=height,
        font=dict(family="-apple-system, Segoe UI, Helvetica, Arial, sans-serif", size=12),
        legend=dict(orientation="h", y=-0.08),
    )
    return fig


def loss_figure(run: RunRecord):
    import plotly.graph_objects as go

    fig = _figure(title="Loss (nats per token)", xaxis_title="optimizer step", yaxis_title="cross-entropy")
    steps, values = run.series("train/loss")
    fig.add_trace(go.Scatter(x=steps, y=values, name="train", line=dict(color=PALETTE[0])))
    steps, values = run.series("val/loss")
    fig.add_trace(
        go.Scatter(x=steps, y=values, name="validation", mode="lines+markers", line=dict(color=PALETTE[1], width=3))
    )
    domain_keys = sorted({k for row in run.metrics for k in row if k.startswith("val/loss/")})
    for i, key in enumerate(domain_keys):
        steps, values = run.series(key)
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=values,
                name=f"validation: {key.split('/')[-1]}",
                mode="lines",
                line=dict(dash="dot", color=PALETTE[(i + 2) % len(PALETTE)]),
            )
        )
    return fig


def load_ratio_heatmap(steps: list[int], loads_ES: np.ndarray, showscale: bool = True):
    """One layer's expert load over time as a heatmap trace: rows = experts, columns = logged steps.

    The colour is log2(load / fair share) on a diverging scale centred on the fair share 1/E (white): red experts
    take more than their share, blue ones less, up to E times (one expert takes everything) and down to 1/E of it
    (darkest blue, dead experts included). A linear scale that tops out at 2/E shows 94% and 26% alike."""
    import plotly.graph_objects as go

    num_experts = loads_ES.shape[0]
    reach = max(math.log2(num_experts), 1.0)
    ratio_ES = np.clip(loads_ES * num_experts, 2.0**-reach, None)
    ticks = list(range(-math.floor(reach), math.floor(reach) + 1))
    return go.Heatmap(
        z=np.log2(ratio_ES),
        x=steps,
        y=[f"E{e}" for e in range(num_experts)],
        zmin=-reach,
        zmax=reach,
        zmid=0,
        colorscale="RdBu_r",
        showscale=showscale,
        customdata=loads_ES * num_experts,
        colorbar=dict(
            title="load /<br>fair share",
            tickvals=ticks,
            ticktext=[f"{2**t:g}x" if t >= 0 else f"1/{2**-t:g}x" for t in ticks],
        ),
        hovertemplate="step %{x}<br>expert %{y}<br>%{customdata:.2f}x the fair share<extra></extra>",
    )


def load_over_time_figure(layers: list[int], steps: list[int], loads_TLE: np.ndarray, title: str = ""):
    """Every MoE layer's expert load over time (loads_TLE: logged steps x layers x experts, shares of the layer's
    routed slots; nan for the experts a narrower layer lacks), one heatmap per layer with shared step axis and one
    colour bar."""
    fig = _subplots(
        len(layers),
        1,
        [f"layer {layer}" for layer in layers],
        height=110 + 150 * len(layers),
        shared_xaxes=True,
        vertical_spacing=0.25 / len(layers),
    )
    for i, _layer in enumerate(layers):
        loads_ES = loads_TLE[:, i, :].T
        loads_ES = loads_ES[~np.isnan(loads_ES).all(1)]  # a layer narrower than the widest: its own experts
        fig.add_trace(load_ratio_heatmap(steps, loads_ES, showscale=i == 0), row=i + 1, col=1)
    fig.update_xaxes(title_text="optimizer step", row=len(layers), col=1)
    fig.update_yaxes(title_text="expert")
    if title:
        fig.update_layout(title=title, margin=dict(t=80))
    return fig


def load_heatmaps(run: RunRecord):
    layers = moe_layers(run)
    series = [load_over_time(run, layer) for layer in layers]
    if not layers or any(loads.size == 0 for _, loads in series):
        return None
    steps = series[0][0]
    if any(len(s) != len(steps) for s, _ in series):
        return None
    widest = max(loads.shape[0] for _, loads in series)  # layers may differ in experts (a pruned model)
    padded = [
        np.pad(loads.T.astype(float), ((0, 0), (0, widest - loads.shape[0])), constant_values=np.nan)
        for _, loads in series
    ]
    return load_over_time_figure(layers, steps, np.stack(padded, axis=1))


def balance_figure(run: RunRecord):
    import plotly.graph_objects as go

    layers = moe_layers(run)
    if not layers:
        return None
    panels = [
        ("imbalance", "max load / mean load (1 = balanced)"),
        ("dropped_frac", "dropped token slots"),
        ("entropy_norm", "router entropy / log E"),
        ("specialization", "specialisation: I(expert; domain)/H(domain)"),
    ]
    fig = _subplots(2, 2, [title for _, title in panels], height=620, vertical_spacing=0.16)
    for i, layer in enumerate(layers):
        color = PALETTE[i % len(PALETTE)]
        for j, (key, _) in enumerate(panels):
            steps, values = run.series(f"moe/layer{layer}/{key}")
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=values,
                    name=f"layer {layer}",
                    legendgroup=f"layer{layer}",
                    showlegend=j == 0,
                    line=dict(color=color),
                ),
                row=j // 2 + 1,
                col=j % 2 + 1,
            )
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    return fig


def experts_per_token_figure(run: RunRecord):
    """Where the number of experts per token varies (top-p, expert choice): each layer's mean over training, and per
    data domain over layers (dotted); None where every token always takes the same number."""
    import plotly.graph_objects as go

    layers = moe_layers(run)
    series = {layer: run.series(f"moe/layer{layer}/experts_per_token") for layer in layers}
    values = [v for _, vs in series.values() for v in vs if v is not None]
    if not values or max(values) - min(values) < 1e-9:
        return None
    fig = _figure(title="experts per token, before capacity", xaxis_title="step")
    for i, (layer, (steps, vs)) in enumerate(series.items()):
        fig.add_trace(go.Scatter(x=steps, y=vs, name=f"layer {layer}", line=dict(color=PALETTE[i % len(PALETTE)])))
    for j, domain in enumerate(domains_of(run)):
        steps, vs = run.series(f"moe/experts_per_token/{domain}")
        if steps:
            color = PALETTE[(len(series) + j) % len(PALETTE)]
            fig.add_trace(go.Scatter(x=steps, y=vs, name=f"{domain} (all layers)", line=dict(dash="dot", color=color)))
    return fig


def analysis_over_time_figure(run: RunRecord):
    """`metrics.analysis_every_n_steps`: per layer, vocabulary specialisation (dotted: random routing's k/E), the
    top-1 repeat rate of consecutive tokens (dotted: chance) and the largest co-activation, over training."""
    import plotly.graph_objects as go

    layers = sorted(
        {
            int(k.split("/")[1][5:])
            for row in run.metrics
            for k in row
            if k.startswith("analysis/layer") and k.endswith("/vocab_specialisation")
        }
    )
    if not layers:
        return None
    panels = [
        ("vocab_specialisation", "random_baseline", "vocabulary specialisation (dotted: random routing)"),
        ("repeat_top1", "repeat_top1_chance", "consecutive tokens, same first choice (dotted: chance)"),
        ("max_coactivation", None, "largest P(expert j | expert i), i != j"),
    ]
    fig = _subplots(1, 3, [title for *_, title in panels], height=400)
    for i, layer in enumerate(layers):
        color = PALETTE[i % len(PALETTE)]
        for j, (key, reference, _) in enumerate(panels):
            steps, values = run.series(f"analysis/layer{layer}/{key}")
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=values,
                    name=f"layer {layer}",
                    legendgroup=f"layer{layer}",
                    showlegend=j == 0,
                    mode="lines+markers",
                    line=dict(color=color),
                ),
                row=1,
                col=j + 1,
            )
            shared = reference == "random_baseline"  # one line for all layers, in grey
            if reference is None or (shared and i > 0):
                continue
            steps, values = run.series(f"analysis/{reference}" if shared else f"analysis/layer{layer}/{reference}")
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=values,
                    name="random routing" if shared else f"layer {layer}, chance",
                    legendgroup=f"layer{layer}",
                    showlegend=False,
                    line=dict(color="#888" if shared else color, dash="dot"),
                ),
                row=1,
                col=j + 1,
            )
    fig.update_xaxes(title_text="optimizer step")
    fig.update_yaxes(tickformat=".0%")
    return fig


def domain_figure(run: RunRecord, layers: Optional[list[int]] = None, name: str = ""):
    """Per layer: p(expert | domain), the share of each domain's tokens that each expert takes."""
    domains = domains_of(run)
    layers = layers if layers is not None else moe_layers(run)
    tables = [(layer, domain_table(run, layer)) for layer in layers]
    tables = [(layer, t) for layer, t in tables if t is not None]
    if not tables or len(domains) < 2:
        return None
    return domain_share_figure(tables, domains, name)


def domain_share_figure(tables: list[tuple[int, np.ndarray]], domains: list[str], name: str = ""):
    """(layer, routing counts (experts, domains)) tables as heatmaps of p(expert | domain): rows = domains,
    columns = experts, the title of each giving the layer's specialisation I(expert; domain) / H(domain)."""
    import plotly.graph_objects as go

    titles = [f"layer {layer}, specialisation {mutual_information(t)[1]:.2f}" for layer, t in tables]
    cols = min(len(tables), 2)
    rows = math.ceil(len(tables) / cols)
    fig = _subplots(rows, cols, titles, height=90 + 60 * len(domains) * rows + 90 * rows, vertical_spacing=0.3 / rows)
    fig.update_annotations(font_size=12)
    if name:  # the run's name above its tables, left-aligned and wrapped: a long one is never cut off
        lines = wrap(name, 60)
        fig.update_layout(
            title=dict(text="<br>".join(lines), x=0, xanchor="left", font_size=13),
            margin=dict(t=50 + 18 * len(lines)),
            height=fig.layout.height + 18 * len(lines),
        )
    for i, (_layer, table) in enumerate(tables):
        share_DE = (table / np.maximum(table.sum(0, keepdims=True), 1)).T  # p(expert | domain)
        num_experts = share_DE.shape[1]
        fig.add_trace(
            go.Heatmap(
                z=share_DE,
                x=[f"E{e}" for e in range(num_experts)],
                y=domains,
                zmin=0,
                zmax=min(1.0, 3.0 / num_experts),
                colorscale="Blues",
                showscale=i == 0,
                colorbar=dict(title="share of the<br>domain's tokens", tickformat=".0%"),
                text=np.round(share_DE * 100).astype(int).astype(str) if num_experts <= 16 else None,
                texttemplate="%{text}%" if num_experts <= 16 else None,
                hovertemplate="domain %{y}<br>expert %{x}<br>%{z:.1%} of the domain's tokens<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_xaxes(title_text="expert", row=rows)
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
        fig.add_trace(
            go.Scatter(x=steps, y=[100 * v for v in values], name="MFU %", yaxis="y2", line=dict(color=PALETTE[5]))
        )
        fig.update_layout(yaxis2=dict(title="MFU %", overlaying="y", side="right"))
    return fig


# ------------------------------------------------------------------------------------------------------------
# Sweep figures


def sweep_bars(runs: list[RunRecord], labels: list[str]):
    import plotly.graph_objects as go

    panels = [
        ("val/loss", "final validation loss (lower is better)"),
        ("moe/mean_imbalance", "mean max/mean load over layers (1 = balanced)"),
        ("moe/specialization", "specialisation (0-1)"),
    ]
    fig = _subplots(1, 3, [t for _, t in panels], height=120 + 34 * len(runs) + 120, horizontal_spacing=0.16)
    for j, (key, _) in enumerate(panels):
        values = [run.final(key) for run in runs]
        fig.add_trace(
            go.Bar(
                y=labels,
                x=[v if v is not None else 0 for v in values],
                orientation="h",
                marker_color=[PALETTE[i % len(PALETTE)] for i in range(len(runs))],
                showlegend=False,
                text=[f"{v:.3f}" if v is not None else "n/a" for v in values],
                textposition="auto",
                hovertemplate="%{y}<br>%{x:.4f}<extra></extra>",
            ),
            row=1,
            col=j + 1,
        )
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(showticklabels=False, col=2)
    fig.update_yaxes(showticklabels=False, col=3)
    return fig


def sweep_curves(runs: list[RunRecord], labels: list[str]):
    import plotly.graph_objects as go

    panels = [
        ("val/loss", "validation loss"),
        ("train/loss", "training loss"),
        ("moe/max_imbalance", "worst layer's max/mean load"),
        ("moe/dropped_frac", "dropped token slots"),
    ]
    fig = _subplots(2, 2, [t for _, t in panels], height=640, vertical_spacing=0.16)
    for i, (run, name) in enumerate(zip(runs, labels)):
        color = PALETTE[i % len(PALETTE)]
        for j, (key, _) in enumerate(panels):
            steps, values = run.series(key)
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=values,
                    name=name,
                    legendgroup=name,
                    showlegend=j == 0,
                    mode="lines+markers" if key == "val/loss" else "lines",
                    line=dict(color=color),
                ),
                row=j // 2 + 1,
                col=j % 2 + 1,
            )
    fig.update_yaxes(tickformat=".0%", row=2, col=2)
    return fig


# What a metric can be: a t interval of a mean is cut to these bounds where it would pass them (an imbalance below 1,
# a share below 0 or above 1 is no possible mean; the interval says "near the bound", the figures say the bound).
POSSIBLE = {
    "val/loss": (0.0, math.inf),
    "train/loss": (0.0, math.inf),
    "moe/mean_imbalance": (1.0, math.inf),
    "moe/max_imbalance": (1.0, math.inf),
    "moe/dropped_frac": (0.0, 1.0),
    "moe/specialization": (0.0, 1.0),
}


def possible(key: str, value: float) -> float:
    low, high = POSSIBLE.get(key, (-math.inf, math.inf))
    return min(max(value, low), high)


def group_bars(ranked: list):
    """Seed groups (`seeds.ranked_groups`), best first: the mean of each metric with its 95% interval as an error bar,
    and every seed's run as a point on it."""
    import plotly.graph_objects as go

    panels = [
        ("val/loss", "final validation loss, mean and 95% CI"),
        ("moe/mean_imbalance", "mean max/mean load (1 = balanced)"),
        ("moe/specialization", "specialisation (0-1)"),
    ]
    names = [f"#{r.rank_text} {r.group.name}" for r in ranked]
    fig = _subplots(1, 3, [t for _, t in panels], height=160 + 40 * len(ranked) + 80, horizontal_spacing=0.16)
    for j, (key, _) in enumerate(panels):
        intervals = [r.group.interval(key) for r in ranked]
        means = [i["mean"] if math.isfinite(i["mean"]) else 0 for i in intervals]
        halves = [i["half"] if math.isfinite(i["half"]) else 0 for i in intervals]
        above = [possible(key, m + h) - m for m, h in zip(means, halves)]
        below = [m - possible(key, m - h) for m, h in zip(means, halves)]
        fig.add_trace(
            go.Bar(
                y=names,
                x=means,
                orientation="h",
                showlegend=False,
                marker_color=[PALETTE[i % len(PALETTE)] for i in range(len(ranked))],
                opacity=0.75,
                error_x=dict(type="data", array=above, arrayminus=below, visible=True, color="#333", thickness=1.5),
                customdata=[[i["n"], i["std"]] for i in intervals],
                hovertemplate="%{y}<br>mean %{x:.4f} over %{customdata[0]} seeds, std "
                "%{customdata[1]:.4f}<extra></extra>",
            ),
            row=1,
            col=j + 1,
        )
        seeds_y = [name for r, name in zip(ranked, names) for _ in r.group.values(key)]
        seeds_x = [v for r in ranked for v in r.group.values(key)]
        fig.add_trace(
            go.Scatter(
                y=seeds_y,
                x=seeds_x,
                mode="markers",
                showlegend=False,
                marker=dict(color="#222", size=6, symbol="circle-open"),
                hovertemplate="%{y}<br>one seed: %{x:.4f}<extra></extra>",
            ),
            row=1,
            col=j + 1,
        )
        if key == "val/loss" and means:  # zoom to the runs: bars from 0 would hide differences of 0.01
            lows = [v for r in ranked for v in r.group.values(key)] + [m - b for m, b in zip(means, below)]
            highs = [v for r in ranked for v in r.group.values(key)] + [m + a for m, a in zip(means, above)]
            pad = 0.15 * max(max(highs) - min(lows), 1e-3)
            fig.update_xaxes(range=[min(lows) - pad, max(highs) + pad], row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(showticklabels=False, col=2)
    fig.update_yaxes(showticklabels=False, col=3)
    return fig


def group_curves(ranked: list):
    """Seed groups' curves: the mean over seeds at each step the runs share, with a band of the 95% t interval."""
    import plotly.graph_objects as go

    from moe_lab.analysis.stats import mean_interval

    panels = [
        ("val/loss", "validation loss"),
        ("train/loss", "training loss"),
        ("moe/max_imbalance", "worst layer's max/mean load"),
        ("moe/dropped_frac", "dropped token slots"),
    ]
    fig = _subplots(2, 2, [t for _, t in panels], height=640, vertical_spacing=0.16)
    for i, r in enumerate(ranked):
        color = PALETTE[i % len(PALETTE)]
        name = f"#{r.rank_text} {r.group.name}"
        for j, (key, _) in enumerate(panels):
            series = [dict(zip(*run.series(key))) for run in r.group.one_run_per_seed()]
            if not series or not all(series):
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            stats = [mean_interval([s[step] for s in series]) for step in steps]
            mean = [st["mean"] for st in stats]
            cell = dict(row=j // 2 + 1, col=j % 2 + 1)
            if len(series) > 1:
                fig.add_trace(
                    go.Scatter(
                        x=steps + steps[::-1],
                        y=[possible(key, st["high"]) for st in stats]
                        + [possible(key, st["low"]) for st in stats][::-1],
                        fill="toself",
                        fillcolor=color,
                        opacity=0.2,
                        mode="lines",
                        line=dict(width=0),
                        hoverinfo="skip",
                        showlegend=False,
                        legendgroup=name,
                    ),
                    **cell,
                )
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=mean,
                    name=name,
                    legendgroup=name,
                    showlegend=j == 0,
                    mode="lines+markers" if key == "val/loss" else "lines",
                    line=dict(color=color),
                    hovertemplate=f"{name}<br>step %{{x}}: mean %{{y:.4f}}<extra></extra>",
                ),
                **cell,
            )
    fig.update_yaxes(tickformat=".0%", row=2, col=2)
    return fig


def to_html(fig) -> str:
    """A figure as an HTML fragment (plotly.js itself is inlined once per page by the template)."""
    return fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG) if fig is not None else ""


# ------------------------------------------------------------------------------------------------------------
# Routing analyses (moe-lab analyze): figures from the report's plain data


def _layer_grid(layers: list[str], titles: list[str], height_per_row: int, cols: int = 2):
    rows = math.ceil(len(layers) / cols)
    return _subplots(
        rows, min(cols, len(layers)), titles, height=80 + height_per_row * rows, vertical_spacing=0.35 / max(rows, 1)
    ), rows


def analysis_domain_figure(report: dict):
    """Per layer: each expert's share of each domain's tokens over the uniform share k/E (log scale, white = k/E)."""
    import plotly.graph_objects as go

    layers, domains, uniform = list(report["layers"]), report["domains"], report["uniform_share"]
    if len(domains) < 2:
        return None
    fig, _ = _layer_grid(
        layers,
        [f"layer {l}, specialisation {report['layers'][l]['domain_specialisation']:.2f}" for l in layers],
        60 * len(domains) + 90,
    )
    for i, layer in enumerate(layers):
        share_ED = np.asarray(report["layers"][layer]["domain_shares"])
        ratio_DE = np.log2(np.clip(share_ED.T / uniform, 1 / 8, 8))
        fig.add_trace(
            go.Heatmap(
                z=ratio_DE,
                x=[f"E{e}" for e in range(share_ED.shape[0])],
                y=domains,
                zmin=-3,
                zmax=3,
                zmid=0,
                colorscale="RdBu_r",
                showscale=i == 0,
                customdata=share_ED.T,
                colorbar=dict(
                    title="share /<br>uniform k/E",
                    tickvals=[-3, -2, -1, 0, 1, 2, 3],
                    ticktext=["1/8x", "1/4x", "1/2x", "1x", "2x", "4x", "8x"],
                ),
                hovertemplate="domain %{y}<br>expert %{x}<br>%{customdata:.1%} of the domain's tokens<extra></extra>",
            ),
            row=i // 2 + 1,
            col=i % 2 + 1,
        )
    return fig


def analysis_summary_figure(report: dict):
    """Per layer: vocabulary specialisation (input and next token) against random routing, and the repeat rate of
    consecutive tokens against chance."""
    import plotly.graph_objects as go

    layers = [f"layer {l}" for l in report["layers"]]
    entries = list(report["layers"].values())
    fig = _subplots(
        1,
        2,
        ["vocabulary specialisation (dashed: random routing)", "consecutive tokens sharing an expert (hollow: chance)"],
        height=380,
    )
    for j, (key, name) in enumerate(
        (("vocab_specialisation_input", "input token"), ("vocab_specialisation_next", "next token"))
    ):
        fig.add_trace(go.Bar(x=layers, y=[e[key] for e in entries], name=name, marker_color=PALETTE[j]), row=1, col=1)
    fig.add_hline(y=report["uniform_share"], line_dash="dash", line_color="#52606d", row=1, col=1)
    for j, (key, name) in enumerate((("repeat_top1", "same first choice"), ("repeat_topk", "a top-k expert shared"))):
        fig.add_trace(
            go.Bar(x=layers, y=[e[key] for e in entries], name=name, marker_color=PALETTE[2 + j]), row=1, col=2
        )
        fig.add_trace(
            go.Bar(
                x=layers,
                y=[e[key + "_chance"] for e in entries],
                name=f"{name}, chance",
                marker=dict(color="rgba(0,0,0,0)", line=dict(color=PALETTE[2 + j], width=2)),
            ),
            row=1,
            col=2,
        )
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    return fig


def analysis_matrix_figure(report: dict, key: str, title: str, x_label: str, y_label: str):
    """Per layer, an experts x experts matrix of the report (co-activation, next-layer transitions)."""
    import plotly.graph_objects as go

    layers = [l for l, e in report["layers"].items() if e.get(key) is not None]
    if not layers:
        return None
    fig, _ = _layer_grid(layers, [title.format(layer=l) for l in layers], 320)
    for i, layer in enumerate(layers):
        matrix = np.asarray(report["layers"][layer][key])
        fig.add_trace(
            go.Heatmap(
                z=matrix,
                x=[f"E{e}" for e in range(matrix.shape[1])],
                y=[f"E{e}" for e in range(matrix.shape[0])],
                zmin=0,
                zmax=1,
                colorscale="Blues",
                showscale=i == 0,
                colorbar=dict(title="probability", tickformat=".0%"),
                hovertemplate=f"{y_label} %{{y}}<br>{x_label} %{{x}}<br>%{{z:.1%}}<extra></extra>",
            ),
            row=i // 2 + 1,
            col=i % 2 + 1,
        )
    fig.update_yaxes(autorange="reversed")
    return fig


def _add_saturation(fig, layer, saturation: list[dict], x: list, color: str) -> None:
    """One layer's router saturation curves (solid: top-k, dotted: top-1) in the second panel."""
    import plotly.graph_objects as go

    for key, dash in (("topk", None), ("top1", "dot")):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[s[key] for s in saturation],
                name=f"layer {layer} {key}",
                legendgroup=layer,
                showlegend=False,
                mode="lines+markers",
                line=dict(color=color, dash=dash),
                hovertemplate=f"layer {layer}, {key}: %{{y:.1%}}<extra></extra>",
            ),
            row=1,
            col=2,
        )


def analysis_position_figure(report: dict):
    """Dropped share of token slots by position, per layer (solid: the analysed capacity; dotted: each
    --capacity-factor); and router saturation per checkpoint, per layer (solid: top-k, dotted: top-1), by training
    step when the checkpoints say it."""
    import plotly.graph_objects as go

    saturated = any(e["saturation"] for e in report["layers"].values())
    fig = _subplots(
        1,
        2 if saturated else 1,
        ["dropped token slots by position in the sequence"]
        + (["router saturation: agreement with the last checkpoint"] if saturated else []),
        height=380,
    )
    steps = report.get("steps") or []
    by_step = saturated and len(steps) == len(report["sources"]) and all(s is not None for s in steps)
    for i, (layer, e) in enumerate(report["layers"].items()):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(
            go.Scatter(y=e["drops_by_position"], name=f"layer {layer}", legendgroup=layer, line=dict(color=color)),
            row=1,
            col=1,
        )
        for factor, curve in e.get("drops_by_position_at", {}).items():
            fig.add_trace(
                go.Scatter(
                    y=curve,
                    name=f"layer {layer}, capacity {factor}",
                    legendgroup=layer,
                    line=dict(color=color, dash="dot"),
                ),
                row=1,
                col=1,
            )
        if saturated:
            x = steps[:-1] if by_step else [str(s) for s in report["sources"][:-1]]
            _add_saturation(fig, layer, e["saturation"], x, color)
    fig.update_xaxes(title_text="position", row=1, col=1)
    fig.update_layout(legend=dict(y=-0.22), margin=dict(b=70))  # below the axis titles
    if saturated:
        fig.update_xaxes(
            title_text="training step (solid: top-k, dotted: top-1)"
            if by_step
            else "checkpoint (solid: top-k, dotted: top-1)",
            row=1,
            col=2,
        )
    fig.update_yaxes(tickformat=".0%")
    return fig


def analysis_stability_figure(report: dict):
    """`--stability`: per layer and in any layer, the share of tokens whose expert set changes under each comparison
    (another precision, mode, batch, checkpoint)."""
    import plotly.graph_objects as go

    result = report["stability"]
    x = [f"layer {l}" for l in result["layers"]] + ["any layer"]
    fig = go.Figure()
    for i, c in enumerate(result["comparisons"].values()):
        y = [c["layers"][l] for l in result["layers"]] + [c["any_layer"]]
        fig.add_trace(go.Bar(x=x, y=y, name=c["label"], marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(
        barmode="group",
        height=380,
        title="tokens whose experts change (0: the routing does not depend on it)",
        yaxis=dict(tickformat=".0%", rangemode="tozero"),
    )
    return fig


def analysis_experts_per_token_figure(report: dict):
    """Routers whose tokens take a varying number of experts: per layer, the share of tokens that took 0, 1, ... E
    experts; and, in the last layer, the token ids that take the most and the fewest on average."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = report["layers"]
    last = layers[list(layers)[-1]]
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.55, 0.45],
        subplot_titles=("tokens by number of experts", f"experts per token id, layer {list(layers)[-1]}"),
    )
    for i, (layer, e) in enumerate(layers.items()):
        hist = e["experts_per_token_hist"]
        total = max(sum(hist), 1)
        fig.add_trace(
            go.Bar(
                x=list(range(len(hist))),
                y=[c / total for c in hist],
                name=f"layer {layer} (mean {e['experts_per_token']:.2f})",
                marker_color=PALETTE[i % len(PALETTE)],
            ),
            row=1,
            col=1,
        )
    listed = last["most_experts_tokens"] + last["fewest_experts_tokens"][::-1]
    labels = [repr(t["text"]) if t["text"] is not None else str(t["token"]) for t in listed]
    fig.add_trace(
        go.Bar(
            x=[t["experts"] for t in listed],
            y=[f"{label} ({t['occurrences']}x)" for label, t in zip(labels, listed)],
            orientation="h",
            marker_color=[PALETTE[3]] * len(last["most_experts_tokens"])
            + [PALETTE[0]] * len(last["fewest_experts_tokens"]),
            showlegend=False,
        ),
        row=1,
        col=2,
    )
    fig.update_layout(barmode="group", height=380)
    fig.update_xaxes(title_text="experts", dtick=1, row=1, col=1)
    fig.update_yaxes(tickformat=".0%", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_xaxes(title_text="mean experts per occurrence", row=1, col=2)
    return fig
