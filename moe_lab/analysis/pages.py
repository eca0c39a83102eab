"""`moe-lab dashboard PATH [-o report.html] [--live]`: one self-contained HTML page for a run or a sweep.

A run page shows the loss curves, each MoE layer's expert load over time, balance, drops, entropy and
specialisation curves, and which experts take which data domain. A sweep page puts the runs side by side: a table of
final metrics sorted by validation loss with each run's overrides, bars of loss, balance and specialisation, curves
overlaid, and each run's expert x domain table. The figures are in `figures.py`, the pages are Jinja2 templates in
`templates/`; plotly's JavaScript and all data are inlined, so a page opens with no network.
"""

from __future__ import annotations

import math
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from moe_lab.analysis import figures
from moe_lab.analysis.runs import (
    RunRecord,
    gather_runs,
    is_run_dir,
    is_sweep_dir,
    labels,
    read_run,
    run_folders,
    summary_rows,
    sweep_runs,
    swept_keys,
)
from moe_lab.analysis.seeds import (
    GROUP_METRICS,
    difference_text,
    differences,
    has_seed_groups,
    ranked_groups,
    seed_groups,
)
from moe_lab.analysis.stats import CONFIDENCE, mutual_information
from moe_lab.errors import DashboardError
from moe_lab.files import write_atomically

GENERATOR = '<meta name="generator" content="moe-lab dashboard">'
TEMPLATES = Path(__file__).resolve().parent / "templates"
# The sweep table's columns: metric, short header (the metric's name is its tooltip), number format.
SWEEP_COLUMNS = [
    ("val/loss", "val loss", ".4f"),
    ("initial_val_loss", "at step 0", ".3f"),
    ("moe/mean_imbalance", "mean imbalance", ".2f"),
    ("moe/max_imbalance", "worst imbalance", ".2f"),
    ("moe/min_load", "min load", ".2f"),
    ("moe/dropped_frac", "dropped", ".1%"),
    ("moe/dead_experts", "dead", ".0f"),
    ("moe/starved_experts", "starved", ".0f"),
    ("moe/specialization", "special&shy;isation", ".3f"),
    ("moe/experts_per_token", "experts per token", ".2f"),
    ("tokens_per_sec_run", "tokens/s (run average)", ",.0f"),
]


def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _render(template: str, **context) -> str:
    from markupsafe import Markup
    from plotly.offline import get_plotlyjs

    return (
        _environment()
        .get_template(template)
        .render(plotly_js=Markup(get_plotlyjs()), generated=f"{datetime.now():%Y-%m-%d %H:%M}", **context)
    )


def _html(fig) -> str:
    from markupsafe import Markup

    return Markup(figures.to_html(fig))


def _fmt(value: Optional[float], spec: str = ".4f") -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def run_page(run: RunRecord, refresh: Optional[int] = None) -> str:
    s = run.summary
    overrides = " ".join(run.overrides) or "defaults"
    params = s.get("params", {})
    last_window = run.final("train/tokens_per_sec")
    mfu = run.final("train/mfu")
    cards = [
        ("validation loss", _fmt(run.final("val/loss")), f"at step 0: {_fmt(s.get('initial_val_loss'))}"),
        (
            "training loss",
            _fmt(run.final("train/loss")),
            f"step {s.get('step', run.series('train/loss')[0][-1:] or '?')}",
        ),
        (
            "tokens / s, run average",
            _fmt(run.final("tokens_per_sec_run"), ",.0f"),
            f"last window {_fmt(last_window, ',.0f')}" + (f"; MFU {_fmt(100 * mfu, '.1f')}%" if mfu else ""),
        ),
        (
            "worst layer imbalance",
            _fmt(run.final("moe/max_imbalance"), ".2f"),
            f"mean over layers {_fmt(run.final('moe/mean_imbalance'), '.2f')}",
        ),
        (
            "dropped slots",
            _fmt(run.final("moe/dropped_frac"), ".1%"),
            f"dead experts: {_fmt(run.final('moe/dead_experts'), '.0f')}, starved (< 10% of the fair share): "
            f"{_fmt(run.final('moe/starved_experts'), '.0f')}",
        ),
        ("specialisation", _fmt(run.final("moe/specialization"), ".3f"), "I(expert; domain) / H(domain)"),
        (
            "experts per token",
            _fmt(run.final("moe/experts_per_token"), ".2f"),
            "mean over layers, before capacity (top-k: k; top-p and expert choice vary)",
        ),
        (
            "parameters",
            f"{params.get('total', 0) / 1e6:.1f}M" if params else "n/a",
            f"{params.get('active', 0) / 1e6:.1f}M active per token" if params else "",
        ),
    ]
    drawn = {
        "loss": _html(figures.loss_figure(run)),
        "load": _html(figures.load_heatmaps(run)),
        "balance": _html(figures.balance_figure(run)),
        "experts": _html(figures.experts_per_token_figure(run)),
        "domains": _html(figures.domain_figure(run)),
        "throughput": _html(figures.throughput_figure(run)),
        "analysis": _html(figures.analysis_over_time_figure(run)),
    }
    lineage = [f"steps to {step}: {path}" for path, step in run.earlier]
    return _render(
        "run.html.j2",
        title=f"moe-lab run: {overrides}",
        path=str(run.path),
        status=run.status,
        overrides=overrides,
        computed=how_it_computed(s.get("produced_by")),
        cards=cards,
        figures=drawn,
        refresh=refresh,
        lineage=lineage,
        gap=run.gap,
    )


def how_it_computed(record: Any) -> str:
    """The run's device, precision, compile and code, as its header said them (from summary.json's produced_by)."""
    if not isinstance(record, dict):
        return "not recorded"
    machine = record.get("machine") if isinstance(record.get("machine"), dict) else {}
    where = f"{record.get('accelerator', '?')} x {record.get('devices', '?')}"
    chip = machine.get("gpu") or machine.get("cpu")
    code = record.get("code") if isinstance(record.get("code"), dict) else {}
    packages = record.get("packages") if isinstance(record.get("packages"), dict) else {}
    parts = [
        where + (f" ({chip})" if chip else ""),
        str(record.get("precision", "?")),
        "compiled" if record.get("compile") else "eager",
        _code(code),
        f"torch {packages.get('torch')}" if packages.get("torch") else "",
    ]
    return ", ".join(p for p in parts if p)


def _code(version: dict) -> str:
    if version.get("commit"):
        return f"commit {str(version['commit'])[:12]}" + (" (dirty)" if version.get("dirty") else "")
    return f"moe-lab {version['package']} (no git checkout)" if version.get("package") else "code version not recorded"


def sweep_page(
    sweep_dir: Path,
    runs: list[RunRecord],
    refresh: Optional[int] = None,
    links_from: Optional[Path] = None,
    title: Optional[str] = None,
) -> str:
    """The side-by-side page of a sweep's runs, or of any runs (`moe-lab dashboard RUN1 RUN2 ...`); each run's own
    page is linked relative to `links_from`, the folder the page is written to (default: the sweep directory)."""
    names = labels(runs)
    by_job = {run.job: (run, name) for run, name in zip(runs, names)}
    rows = summary_rows(runs)
    best = _best_jobs(rows)
    links_from = links_from or sweep_dir
    from markupsafe import Markup

    def name_of(job: Optional[str]) -> str:
        return by_job[job][1] if job in by_job else ""

    cards = _sweep_cards(len(runs), rows, best, name_of)
    table = [
        _sweep_row(
            r, by_job[r["job"]][0], name_of(r["job"]), r["job"] == best["balance"], r["job"] == best["loss"], links_from
        )
        for r in rows
    ]
    grouped, drawn = _seed_group_view(runs, names, cards)
    drawn["domains"] = _domain_figures(runs, names)
    return _render(
        "sweep.html.j2",
        title=title or f"moe-lab sweep: {sweep_dir.name}",
        path=str(sweep_dir),
        swept=swept_keys(runs),
        cards=cards,
        columns=[(c, Markup(header)) for c, header, _ in SWEEP_COLUMNS],
        rows=table,
        figures=drawn,
        refresh=refresh,
        grouped=grouped,
    )


def _best_jobs(rows: list[dict]) -> dict[str, Optional[str]]:
    """The jobs of the best validation loss (rows come ranked), the best balance and the most specialisation."""
    done = [r for r in rows if isinstance(r["val/loss"], float)]
    balanced = [r for r in done if isinstance(r["moe/mean_imbalance"], float)]
    special = [r for r in done if isinstance(r["moe/specialization"], float)]
    return {
        "loss": done[0]["job"] if done else None,
        "balance": min(balanced, key=lambda r: r["moe/mean_imbalance"])["job"] if balanced else None,
        "special": max(special, key=lambda r: r["moe/specialization"])["job"] if special else None,
    }


def _sweep_cards(count: int, rows: list[dict], best: dict, name_of: Callable[[Optional[str]], str]) -> list[tuple]:
    """The cards above the sweep table: runs, best loss, best balanced, most specialised."""
    by_job = {r["job"]: r for r in rows}

    def value(job: Optional[str], key: str, spec: str = ".4f") -> str:
        return _fmt(by_job[job][key], spec) if job is not None else "n/a"

    finished = sum(r["status"] == "finished" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    return [
        ("runs", str(count), f"{finished} finished, {failed} failed"),
        ("best validation loss", value(best["loss"], "val/loss"), name_of(best["loss"])),
        ("best balanced", value(best["balance"], "moe/mean_imbalance", ".2f"), name_of(best["balance"])),
        ("most specialised", value(best["special"], "moe/specialization", ".3f"), name_of(best["special"])),
    ]


def _seed_group_view(runs: list[RunRecord], names: list[str], cards: list[tuple]) -> tuple[Optional[dict], dict]:
    """(the seed groups' table or None, the bars and curves): with seeds repeated, means with intervals, error bars
    and bands instead of single runs, and the best-loss card says which group is best."""
    groups = seed_groups(runs)
    if not has_seed_groups(groups):
        return None, {
            "bars": _html(figures.sweep_bars(runs, names)),
            "curves": _html(figures.sweep_curves(runs, names)),
        }
    ranked = ranked_groups(groups)
    grouped = {
        "rows": [_group_row(r) for r in ranked],
        "columns": [t for _, t, _ in GROUP_METRICS[1:]],
        "differences": [_difference_text(d) for d in differences(ranked)],
        "overlap": any(r.overlaps for r in ranked),
        "confidence": int(round(CONFIDENCE * 100)),
    }
    best = ranked[0] if ranked else None
    if best is not None:
        overlap = f" (not separated from #{', #'.join(map(str, best.overlaps))})" if best.overlaps else ""
        cards[1] = ("best mean validation loss", _fmt(best.interval["mean"]), f"{best.group.name}{overlap}")
    else:
        cards[1] = ("best mean validation loss", "n/a", "")
    return grouped, {"bars": _html(figures.group_bars(ranked)), "curves": _html(figures.group_curves(ranked))}


def _sweep_row(r: dict, run: RunRecord, label: str, best_balance: bool, best_loss: bool, links_from: Path) -> dict:
    """One run's row of the sweep table: its cells, marked good (best) or bad (starving or collapsing routing)."""
    cells = [
        {
            "text": _fmt(r[c], spec),
            "good": (c == "moe/mean_imbalance" and best_balance) or (c == "val/loss" and best_loss),
            # Starving or collapsing routing is flagged on every run, not only the best ones.
            "bad": (c in ("moe/dead_experts", "moe/starved_experts") and isinstance(r[c], float) and r[c] > 0)
            or (c == "moe/min_load" and isinstance(r[c], float) and r[c] < 0.1),
        }
        for c, _, spec in SWEEP_COLUMNS
    ]
    return {
        "job": r["job"],
        "label": label,
        "cells": cells,
        "status": r["status"],
        "error": run.error,
        "overrides": r["overrides"].split(),
        "best": best_loss,
        "page": relative_link(run.path / "dashboard.html", links_from)
        if (run.path / "dashboard.html").exists()
        else "",
    }


def relative_link(target: Path, links_from: Path) -> str:
    """An href to `target` from the page in `links_from`: a relative path whose every part is percent-encoded (a
    folder named `javascript:alert(1)` becomes `./javascript%3Aalert%281%29/...`), starting with ./ or ../, so no
    scheme can ever be read into it; "" (no link) when no relative path leads there (another drive)."""
    from urllib.parse import quote

    try:
        relative = Path(os.path.relpath(target, links_from))
    except ValueError:
        return ""
    link = "/".join(part if part == ".." else quote(part, safe="") for part in relative.parts)
    return link if link.startswith("../") else f"./{link}"


def _domain_figures(runs: list[RunRecord], names: list[str]) -> list:
    """Each run's expert x domain figure, of its most specialised MoE layer."""
    parts = []
    for run, name in zip(runs, names):
        layers = figures.moe_layers(run)
        scored = [
            (mutual_information(t)[1], layer) for layer in layers if (t := figures.domain_table(run, layer)) is not None
        ]
        if not scored:
            continue
        fig = figures.domain_figure(run, [max(scored)[1]], name=name)
        if fig is not None:
            fig.update_layout(height=fig.layout.margin.t + 170 + 40 * len(figures.domains_of(run)))
            parts.append(_html(fig))
    return parts


def _group_row(r) -> dict:
    i = r.interval
    cells = []
    for key, _, spec in GROUP_METRICS[1:]:
        mean = r.group.interval(key)["mean"]
        cells.append(
            {
                "text": _fmt(mean, spec),
                "bad": key in ("moe/dead_experts", "moe/starved_experts") and math.isfinite(mean) and mean > 0,
            }
        )
    return {
        "rank": r.rank_text,
        "name": r.group.name,
        "runs": f"{len(r.group.finished)}/{len(r.group.runs)}",
        "seeds": ", ".join(dict.fromkeys(r.group.seeds))
        + (f" ({r.group.repeats} run(s) repeat a seed: each seed counts once)" if r.group.repeats else ""),
        "loss": f"{_fmt(i['mean'])} [{_fmt(i['low'])}, {_fmt(i['high'])}]",
        "std": _fmt(i["std"]),
        "cells": cells,
        "overlaps": ", ".join(f"#{o}" for o in r.overlaps),
    }


def _difference_text(d: dict) -> str:
    return f"#{d['a'].rank} {d['a'].group.name} minus #{d['b'].rank} {d['b'].group.name}: {difference_text(d)}"


def analysis_page(report: dict) -> str:
    """The page of a `moe-lab analyze` report (its plain data: the page can be rebuilt from the JSON alone)."""
    layers = list(report["layers"].values())
    mean = lambda key: float(np.mean([e[key] for e in layers]))  # noqa: E731
    cards = [
        ("tokens analysed", f"{report['tokens']:,}", f"top-{report['top_k']} of {report['num_experts']} experts"),
        (
            "vocabulary specialisation",
            _fmt(mean("vocab_specialisation_input"), ".3f"),
            f"mean over layers; random routing {report['uniform_share']:.3f}",
        ),
        ("domain specialisation", _fmt(mean("domain_specialisation"), ".3f"), "I(expert; domain) / H(domain)"),
        ("repeat rate, top-1", _fmt(mean("repeat_top1"), ".1%"), f"chance {mean('repeat_top1_chance'):.1%}"),
    ]
    keys = list(report["layers"])
    tokens = [
        {
            "layer": key,
            "experts": [
                [
                    repr(t["text"])[1:-1] if t["text"] is not None else str(t["token"])
                    for t in report["layers"][key]["expert_tokens"][str(e)]
                ]
                for e in range(report["num_experts"])
            ],
        }
        for key in dict.fromkeys([keys[0], keys[-1]])
    ]
    drawn = {
        "domains": _html(figures.analysis_domain_figure(report)),
        "summary": _html(figures.analysis_summary_figure(report)),
        "coactivation": _html(
            figures.analysis_matrix_figure(report, "coactivation", "layer {layer}", "expert j", "expert i")
        ),
        "transitions": _html(
            figures.analysis_matrix_figure(
                report, "next_layer_transitions", "layer {layer} -> next MoE layer", "next layer's", "this layer's"
            )
        ),
        "position": _html(figures.analysis_position_figure(report)),
    }
    if "stability" in report:
        drawn["stability"] = _html(figures.analysis_stability_figure(report))
    if report.get("experts_vary"):
        drawn["experts_per_token"] = _html(figures.analysis_experts_per_token_figure(report))
        cards[0] = (
            "tokens analysed",
            f"{report['tokens']:,}",
            f"{mean('experts_per_token'):.2f} of {report['num_experts']} experts per token on average",
        )
    return _render(
        "analysis.html.j2",
        title="moe-lab analyze: routing",
        sources=report["sources"],
        data=report["data"],
        capacity=report["capacity"],
        cards=cards,
        tokens=tokens,
        figures=drawn,
        refresh=None,
    )


def write_analysis_page(report: dict, out: Path | str) -> Path:
    return _write(checked_output(Path(out).expanduser()), analysis_page(report))


# ------------------------------------------------------------------------------------------------------------
# Writing


def write_dashboard(path: Path | str, out: Optional[Path | str] = None, refresh: Optional[int] = None) -> Path:
    """Write the dashboard of a run or sweep directory; returns the file written."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DashboardError(
            f"{path}: no such directory (give a run directory such as outputs/DATE/TIME, or a "
            "sweep directory such as outputs/multirun/DATE/TIME)"
        )
    out = checked_output(Path(out).expanduser() if out is not None else path / "dashboard.html")
    if is_run_dir(path) and (path / "metrics.csv").exists():
        page = run_page(read_run(path), refresh)
    elif is_sweep_dir(path):
        runs = sweep_runs(path)
        if not runs:
            raise DashboardError(f"{path} holds no runs yet")
        page = sweep_page(path, runs, refresh, links_from=out.parent)
    elif run_folders(path):
        runs = run_folders(path)
        named = ", ".join(p.name for p in runs[:3]) + (", ..." if len(runs) > 3 else "")
        raise DashboardError(
            f"{path} is not a sweep (it has no multirun.yaml) but a folder of {len(runs)} separate runs ({named}); "
            f"show one with moe-lab dashboard {runs[0]}, or compare them side by side with moe-lab dashboard "
            f"{path}/* -o compare.html"
        )
    else:
        raise DashboardError(
            f"{path} is neither a run directory (with metrics.csv) nor a sweep directory "
            "(with job directories 0/, 1/, ...)"
        )
    return _write(out, page)


def write_comparison(paths: list[Path | str], out: Path | str, refresh: Optional[int] = None) -> tuple[Path, list]:
    """The side-by-side page of any run directories (a sweep directory counts as all its runs), as a sweep's page;
    returns the file written and the runs, in the order the page ranks them."""
    out = checked_output(Path(out).expanduser())
    runs = gather_runs([Path(p).expanduser() for p in paths])
    common = Path(os.path.commonpath([run.path for run in runs]))
    page = sweep_page(common, runs, refresh, links_from=out.parent, title=f"moe-lab comparison: {len(runs)} runs")
    return _write(out, page), runs


def checked_output(out: Path) -> Path:
    """`out`, if a page may be written there: its folder exists and it is not a file moe-lab did not write."""
    if not out.parent.is_dir():
        raise DashboardError(f"-o {out}: the folder {out.parent} does not exist; create it or choose another path")
    if out.is_dir():
        raise DashboardError(f"-o {out} is a directory; give the HTML file to write, e.g. {out / 'dashboard.html'}")
    if out.exists() and GENERATOR not in out.read_text(errors="ignore")[:20000]:
        raise DashboardError(
            f"{out} exists and was not written by moe-lab dashboard; moe-lab never writes over "
            "files: choose another path with -o"
        )
    return out


def _write(out: Path, page: str) -> Path:
    try:
        write_atomically(out, page)  # a browser refreshing a live page never reads half a file
    except OSError as e:
        raise DashboardError(f"cannot write {out} ({e.strerror})") from None
    return out


def live(write: Callable[[Optional[int]], Path], interval: int) -> None:  # pragma: no cover - runs until stopped
    """Call `write(refresh)` every `interval` seconds (the page reloads itself as often) until Ctrl-C or SIGTERM,
    then write a final page that no longer reloads. The handlers are installed here: a process started in the
    background by a non-interactive shell inherits SIGINT ignored, and would otherwise never stop on it."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    target = None
    try:
        while True:
            try:
                target = write(interval)
                print(
                    f"\rmoe-lab: dashboard {target} updated {datetime.now():%H:%M:%S} (Ctrl-C to stop)",
                    end="",
                    flush=True,
                )
            except DashboardError as e:
                print(f"\rmoe-lab: waiting: {e}", end="", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        if target is not None:
            write(None)  # a final page that no longer reloads
        print()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
