"""`moe-lab analyze CKPT [CKPT ...] [data=...]`: the routing analyses of `moe_lab/analysis/routing.py`, on any data.

The model runs over the held-out blocks of the data (packed as training packs them, with the model's tokenizer), in
batches, without gradients; each batch's routing decisions are added to count tables whose size does not depend on
the amount of data (`RoutingCounts`). With several checkpoints of one run, the last is analysed and each earlier one
is compared with it token by token (router saturation, OLMoE). Every router: a token's expert set may have any size
(expert choice, top-p, null experts, ReLU routing), and where it varies the report says which tokens take the most
experts.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from moe_lab.analysis.routing import (
    RoutingCounts,
    coactivation,
    domain_shares,
    drops_by_position,
    experts_per_token,
    layer_transitions,
    random_share,
    repeat_rates,
    saturation,
    vocab_specialisation,
)
from moe_lab.analysis.stats import mutual_information
from moe_lab.analysis.trace import TraceWriter
from moe_lab.errors import UserError
from moe_lab.model import MoETransformer
from moe_lab.tools.stability import format_stability, stability
from moe_lab.training.routing_replay import layer_choices, trace_writer, write_choices


def check_analysable(model: MoETransformer) -> None:
    if not model.moe_layers:
        raise UserError("the model is dense: there is no routing to analyse")


@contextlib.contextmanager
def eval_capacity(model: MoETransformer, capacity_factor: Optional[float]) -> Iterator[None]:
    """The model's MoE layers evaluate under another capacity factor (None: dropless) inside the block."""
    settings = {id(moe.cfg): moe.cfg for moe in model.moe_modules()}
    before = {key: cfg.eval_capacity_factor for key, cfg in settings.items()}
    try:
        for cfg in settings.values():
            cfg.eval_capacity_factor = capacity_factor
        yield
    finally:
        for key, cfg in settings.items():
            cfg.eval_capacity_factor = before[key]


def check_capacity_factors(model: MoETransformer, capacity_factors: Sequence[float]) -> None:
    for factor in capacity_factors:
        if not factor > 0:
            raise UserError(
                f"--capacity-factor {factor}: a capacity factor is a positive number (1.0: an expert takes "
                "its fair share of token slots)"
            )
    if capacity_factors and not all(moe.router.uses_capacity for moe in model.moe_modules()):
        raise UserError(
            f"--capacity-factor: router={model.moe_modules()[0].router.registered_name} has no capacity limit to vary"
        )


@torch.no_grad()
def analyze(
    models: list[MoETransformer],
    batches: Iterable[dict],
    vocab_size: int,
    num_domains: int,
    seq_len: int,
    progress=None,
    trace: Optional[TraceWriter] = None,
    capacity_factors: Sequence[float] = (),
) -> dict[str, Any]:
    """The analyses of the last model over `batches`, the saturation of each earlier model against it, and the
    drops by position of the last model under each of `capacity_factors` (besides its own setting)."""
    final = models[-1]
    check_analysable(final)
    check_capacity_factors(final, capacity_factors)
    dropped_FLS = np.zeros((len(capacity_factors), len(final.moe_layers), seq_len), dtype=np.int64)
    counts = RoutingCounts(
        len(final.moe_layers),
        final.cfg.moe.num_experts,
        final.moe_modules()[0].top_k,
        vocab_size,
        num_domains,
        seq_len,
        layer_experts=final.layer_experts(),
    )
    agree = np.zeros((len(models) - 1, len(final.moe_layers), 2))
    tokens = 0
    for n, batch in enumerate(batches):
        keep = batch["valid"].bool()
        ids = batch["input_ids"][keep]
        if len(ids) == 0:
            continue
        inputs, targets = ids[:, :-1], ids[:, 1:]
        B, S = inputs.shape
        domain_B = batch["domain"][keep]
        choices = layer_choices(final, final(inputs, domain_B=domain_B), B, S)
        counts.add(choices.experts, inputs.numpy(), targets.numpy(), domain_B.numpy(), choices.dropped)
        if trace is not None:
            write_choices(trace, inputs.numpy(), targets.numpy(), domain_B.numpy(), choices)
        for f, factor in enumerate(capacity_factors):
            with eval_capacity(final, factor):
                dropped_LBSK = layer_choices(final, final(inputs, domain_B=domain_B), B, S).dropped
            dropped_FLS[f, :, :S] += dropped_LBSK.sum(axis=(1, 3))
        for i, earlier in enumerate(models[:-1]):
            mine = layer_choices(earlier, earlier(inputs, domain_B=domain_B), B, S).experts
            for l in range(len(final.moe_layers)):
                E = final.cfg.moe.num_experts
                top1, topk = saturation(mine[l].reshape(B * S, -1), choices.experts[l].reshape(B * S, -1), E)
                agree[i, l] += np.array([top1, topk]) * B * S
        tokens += B * S
        if progress is not None:
            progress(n + 1, tokens)
    if tokens == 0:
        raise UserError("no data to analyse")
    drops_at = {
        float(factor): dropped_FLS[f] / np.maximum(counts.slots_LS, 1) for f, factor in enumerate(capacity_factors)
    }
    return {
        "counts": counts,
        "saturation": agree / tokens,
        "tokens": tokens,
        "drops_at": drops_at,
        "steps": [model.checkpoint_step for model in models],
    }


def summary(
    result: dict[str, Any], domain_names: list[str], layers: list[int], decode=None, top_tokens: int = 5
) -> dict[str, Any]:
    """Plain data (JSON) of every analysis, per MoE layer."""
    counts: RoutingCounts = result["counts"]
    k, E = counts.top_k, counts.num_experts
    shares = domain_shares(counts)
    vocab_in, mean_in, favourite_in = vocab_specialisation(counts.input_LVE, counts.input_V, min_count=5)
    vocab_next, mean_next, _ = vocab_specialisation(counts.next_LVE, counts.next_V, min_count=5)
    co = coactivation(counts)
    follow = layer_transitions(counts)
    repeats = repeat_rates(counts)
    drops = drops_by_position(counts)
    uniform = random_share(counts)
    out: dict[str, Any] = {
        "tokens": result["tokens"],
        "top_k": k,
        "num_experts": E,
        "uniform_share": float(uniform.mean()),
        "experts_vary": bool((counts.size_LN > 0).sum(-1).max() > 1),
        "domains": domain_names,
        "steps": result.get("steps"),
        "layers": {},
    }
    for l, layer in enumerate(layers):
        experts_tokens = {}
        for e in range(E):  # the tokens most specialised in expert e (seen at least 5 times)
            mine = np.flatnonzero((favourite_in[l] == e) & ~np.isnan(vocab_in[l]))
            best = mine[np.argsort(-vocab_in[l][mine], kind="stable")][:top_tokens]
            experts_tokens[str(e)] = [
                {"token": int(t), "text": decode([int(t)]) if decode else None, "share": float(vocab_in[l][t])}
                for t in best
            ]
        out["layers"][str(layer)] = {
            "domain_shares": shares[l].tolist(),
            "domain_specialisation": mutual_information(counts.domain_LED[l])[1],
            "vocab_specialisation_input": float(mean_in[l]),
            "vocab_specialisation_next": float(mean_next[l]),
            "vocab_random_baseline": float(uniform[l]),
            **experts_per_token_report(counts, l, domain_names, decode, top_tokens),
            "expert_tokens": experts_tokens,
            "coactivation": co[l].tolist(),
            "next_layer_transitions": follow[l].tolist() if l < len(follow) else None,
            "repeat_top1": float(repeats["top1"][l]),
            "repeat_top1_chance": float(repeats["top1_chance"][l]),
            "repeat_topk": float(repeats["topk"][l]),
            "repeat_topk_chance": float(repeats["topk_chance"][l]),
            "drops_by_position": drops[l].tolist(),
            "drops_by_position_at": {str(f): d[l].tolist() for f, d in result.get("drops_at", {}).items()},
            "saturation": [{"top1": float(s[l, 0]), "topk": float(s[l, 1])} for s in result["saturation"]],
        }
    return out


def experts_per_token_report(
    counts: RoutingCounts, l: int, domain_names: list[str], decode=None, top: int = 5, min_count: int = 5
) -> dict[str, Any]:
    """Layer l's experts per token: the mean, the distribution (tokens with 0..E experts), the mean per domain, and
    the token ids (seen min_count times or more) that take the most and the fewest experts on average."""
    mean = experts_per_token(counts)[l]
    seen = np.flatnonzero(counts.input_V >= min_count)
    per_id = counts.size_LV[l][seen] / counts.input_V[seen]
    order = seen[np.argsort(-per_id, kind="stable")]
    by_id = dict(zip(seen.tolist(), per_id.tolist()))

    def listed(ids: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "token": int(t),
                "text": decode([int(t)]) if decode else None,
                "experts": by_id[int(t)],
                "occurrences": int(counts.input_V[t]),
            }
            for t in ids
        ]

    return {
        "experts_per_token": float(mean),
        "experts_per_token_hist": counts.size_LN[l].tolist(),
        "experts_per_token_by_domain": {
            d: float(counts.size_LD[l, i] / max(counts.tokens_D[i], 1)) for i, d in enumerate(domain_names)
        },
        "most_experts_tokens": listed(order[:top]),
        "fewest_experts_tokens": listed(order[::-1][:top]),
    }


def format_summary(report: dict[str, Any]) -> str:
    vary = report.get("experts_vary", False)
    routing = f"top-{report['top_k']} of {report['num_experts']} experts"
    if vary:
        routing = f"a varying number of the {report['num_experts']} experts per token"
    lines = [
        f"  {report['tokens']:,} tokens; {routing} "
        f"(random routing: vocabulary specialisation {report['uniform_share']:.3f})",
        "  layer  domain spec.  vocab spec. (in / next)  repeat top-1 (chance)  repeat top-k (chance)  "
        "drops first/last half"
        + ("  saturation top-1 / top-k" if any(e["saturation"] for e in report["layers"].values()) else ""),
    ]
    for layer, e in report["layers"].items():
        drops = e["drops_by_position"]
        half = len(drops) // 2
        line = (
            f"  {layer:>5}  {e['domain_specialisation']:>12.3f}  {e['vocab_specialisation_input']:>11.3f} / "
            f"{e['vocab_specialisation_next']:<9.3f}  {e['repeat_top1']:>12.3f} ({e['repeat_top1_chance']:.3f})"
            f"  {e['repeat_topk']:>12.3f} ({e['repeat_topk_chance']:.3f})  "
            f"{np.mean(drops[:half]):>9.1%} / {np.mean(drops[half:]):.1%}"
        )
        if e["saturation"]:
            line += "  " + ", ".join(f"{s['top1']:.2f} / {s['topk']:.2f}" for s in e["saturation"])
        lines.append(line)
    if vary:
        lines += format_experts_per_token(report)
    return "\n".join(lines)


def format_experts_per_token(report: dict[str, Any]) -> list[str]:
    """Per layer: experts per token (mean, share of tokens with none, the most any took) and the tokens that take
    the most and the fewest."""

    def tokens(listed: list[dict[str, Any]]) -> str:
        return ", ".join(f"{(t['text'] if t['text'] is not None else t['token'])!r} {t['experts']:.2f}" for t in listed)

    lines = ["  layer  experts/token  none   max  most experts (mean)  /  fewest"]
    for layer, e in report["layers"].items():
        hist = e["experts_per_token_hist"]
        most = max(n for n, c in enumerate(hist) if c) if any(hist) else 0
        lines.append(
            f"  {layer:>5}  {e['experts_per_token']:>13.2f}  {hist[0] / max(sum(hist), 1):>5.1%}  {most:>3}  "
            f"{tokens(e['most_experts_tokens'][:3])}  /  {tokens(e['fewest_experts_tokens'][:3])}"
        )
    return lines


def analysis_tables(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The report as long tables (one row per layer, per layer x domain x expert, ...), for CSV files and W&B
    tables: the shape pandas and plotting libraries read as they are."""
    layers = report["layers"]
    steps = report.get("steps") or [None] * len(report["sources"])
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in ANALYSIS_TABLES}
    for layer, e in layers.items():
        drops = e["drops_by_position"]
        tables["layers"].append(
            {
                "layer": int(layer),
                "domain_specialisation": e["domain_specialisation"],
                "vocab_specialisation_input": e["vocab_specialisation_input"],
                "vocab_specialisation_next": e["vocab_specialisation_next"],
                "vocab_random_baseline": e["vocab_random_baseline"],
                "repeat_top1": e["repeat_top1"],
                "repeat_top1_chance": e["repeat_top1_chance"],
                "repeat_topk": e["repeat_topk"],
                "repeat_topk_chance": e["repeat_topk_chance"],
                "dropped_share": float(np.mean(drops)) if drops else 0.0,
            }
        )
        for d, domain in enumerate(report["domains"]):
            for x, share in enumerate(row[d] for row in e["domain_shares"]):
                tables["domain_shares"].append(
                    {
                        "layer": int(layer),
                        "domain": domain,
                        "expert": x,
                        "share": share,
                        "uniform_share": report["uniform_share"],
                    }
                )
        for x, best in e["expert_tokens"].items():
            for rank, t in enumerate(best):
                tables["expert_tokens"].append(
                    {
                        "layer": int(layer),
                        "expert": int(x),
                        "rank": rank + 1,
                        "token": t["token"],
                        "text": t["text"],
                        "share": t["share"],
                    }
                )
        for name, key in (("coactivation", "coactivation"), ("transitions", "next_layer_transitions")):
            for i, row in enumerate(e[key] or []):
                for j, p in enumerate(row):
                    tables[name].append({"layer": int(layer), "expert_i": i, "expert_j": j, "probability": p})
        curves = {"checkpoint": drops, **e.get("drops_by_position_at", {})}
        for factor, curve in curves.items():
            for position, share in enumerate(curve):
                tables["drops_by_position"].append(
                    {"layer": int(layer), "capacity_factor": factor, "position": position, "dropped_share": share}
                )
        for n, tokens in enumerate(e.get("experts_per_token_hist", [])):
            tables["experts_per_token"].append({"layer": int(layer), "experts": n, "tokens": tokens})
        for which in ("most", "fewest"):
            for rank, t in enumerate(e.get(f"{which}_experts_tokens", [])):
                tables["token_experts"].append(
                    {
                        "layer": int(layer),
                        "list": which,
                        "rank": rank + 1,
                        "token": t["token"],
                        "text": t["text"],
                        "occurrences": t["occurrences"],
                        "experts": t["experts"],
                    }
                )
        for name, c in report.get("stability", {}).get("comparisons", {}).items():
            tables["stability"].append(
                {"layer": int(layer), "comparison": name, "label": c["label"], "changed_share": c["layers"][layer]}
            )
        for source, step, s in zip(report["sources"], steps, e["saturation"]):
            tables["saturation"].append(
                {"layer": int(layer), "checkpoint": str(source), "step": step, "top1": s["top1"], "topk": s["topk"]}
            )
    return tables


# Their columns, in order (the CSV headers; an existing file with another header was not written by moe-lab).
ANALYSIS_TABLES = {
    "layers": [
        "layer",
        "domain_specialisation",
        "vocab_specialisation_input",
        "vocab_specialisation_next",
        "vocab_random_baseline",
        "repeat_top1",
        "repeat_top1_chance",
        "repeat_topk",
        "repeat_topk_chance",
        "dropped_share",
    ],
    "domain_shares": ["layer", "domain", "expert", "share", "uniform_share"],
    "expert_tokens": ["layer", "expert", "rank", "token", "text", "share"],
    "coactivation": ["layer", "expert_i", "expert_j", "probability"],
    "transitions": ["layer", "expert_i", "expert_j", "probability"],
    "drops_by_position": ["layer", "capacity_factor", "position", "dropped_share"],
    "saturation": ["layer", "checkpoint", "step", "top1", "topk"],
    "stability": ["layer", "comparison", "label", "changed_share"],
    "experts_per_token": ["layer", "experts", "tokens"],
    "token_experts": ["layer", "list", "rank", "token", "text", "occurrences", "experts"],
}


def csv_paths(page: Path) -> dict[str, Path]:
    """The CSV files beside a report's page: PAGE_STEM.TABLE.csv."""
    return {name: page.with_name(f"{page.stem}.{name}.csv") for name in ANALYSIS_TABLES}


def check_csv_outputs(page: Path) -> None:
    """Refuses to replace a CSV file that moe-lab analyze did not write (its header says), before any work."""
    for name, path in csv_paths(page).items():
        if path.exists():
            with open(path, errors="ignore") as f:
                header = f.readline().strip()
            if header != ",".join(ANALYSIS_TABLES[name]):
                raise UserError(f"{path} exists and was not written by moe-lab analyze; choose another -o")


def write_csv_tables(report: dict[str, Any], page: Path) -> list[Path]:
    import csv
    import io

    from moe_lab.files import write_atomically

    written = []
    for (name, rows), path in zip(analysis_tables(report).items(), csv_paths(page).values()):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=ANALYSIS_TABLES[name], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomically(path, text.getvalue())
        written.append(path)
    return written


def log_to_wandb(report: dict[str, Any], node: dict[str, Any], folder: Path, name: str) -> str:
    """One W&B run (job_type "analyze") holding the report: a table per analysis, the page's figures, the summary
    numbers per layer. Offline (said once) without credentials or server, as training does. Returns where it went."""
    import wandb

    from moe_lab.analysis import figures
    from moe_lab.training.loggers import wandb_online

    where = folder / "wandb"
    online = wandb_online(node, f"logging offline to {where}; upload later with `wandb sync {where}/offline-run-*`")
    mode = "online" if online else "disabled" if os.environ.get("WANDB_MODE") == "disabled" else "offline"
    run = wandb.init(
        project=node.get("project") or "moe-lab",
        entity=node.get("entity"),
        name=node.get("name") or name,
        group=node.get("group"),
        tags=list(node.get("tags") or []),
        job_type="analyze",
        dir=str(folder),
        mode=mode,
        config={
            "sources": [str(s) for s in report["sources"]],
            "data": report["data"],
            "capacity": report["capacity"],
            "tokens": report["tokens"],
        },
        reinit="finish_previous",
    )
    try:
        for table, rows in analysis_tables(report).items():
            columns = ANALYSIS_TABLES[table]
            run.log({f"analysis/{table}": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})
        drawn = {
            "domains": figures.analysis_domain_figure(report),
            "summary": figures.analysis_summary_figure(report),
            "coactivation": figures.analysis_matrix_figure(
                report, "coactivation", "layer {layer}", "expert j", "expert i"
            ),
            "position": figures.analysis_position_figure(report),
        }
        run.log({f"analysis/figure/{key}": wandb.Plotly(fig) for key, fig in drawn.items()})
        for layer, e in report["layers"].items():
            for key in (
                "domain_specialisation",
                "vocab_specialisation_input",
                "vocab_specialisation_next",
                "repeat_top1",
                "repeat_topk",
            ):
                run.summary[f"analysis/{key}/layer{layer}"] = e[key]
        return run.dir if mode == "online" else f"{where} ({mode})"
    finally:
        run.finish()


# ------------------------------------------------------------------------------------------------------------
# The command


def run(args: Any, cfg: Any, sources: list[str]) -> int:
    """`moe-lab analyze` with its parsed arguments (moe_lab/cli/commands.py), its composed data settings `cfg` and
    its checkpoints (oldest first): the report printed, and written as a page, JSON, CSV tables (and to W&B)."""
    import json
    import sys

    from moe_lab.analysis.pages import write_analysis_page
    from moe_lab.files import write_atomically
    from moe_lab.tools.evaluate import held_out_data

    page_out = args.output
    json_out = check_outputs(page_out)
    wandb_node = wandb_settings(cfg)
    models, tokenizer, described = load_models(sources, args.capacity, args.device)
    final = models[-1]
    check_capacity_factors(final, args.capacity_factor)
    check_analysable(final)
    run_cfg, data, loader = held_out_data(cfg, tokenizer, final.cfg, args.max_batches)
    print(
        f"moe-lab: analysing {described} on {data.describe()}: {len(loader.batch_sampler)} batches of "
        f"{run_cfg.data.batch_size} x {run_cfg.data.seq_len} tokens",
        file=sys.stderr,
        flush=True,
    )

    result = analyze_with_progress(models, loader, run_cfg.data.seq_len, data.domain_names, args)
    print(file=sys.stderr)
    report = {
        "sources": sources,
        "data": data.describe(),
        "capacity": args.capacity,
        **summary(result, data.domain_names, final.moe_layers, decode=tokenizer.decode),
    }
    print(format_summary(report))
    if args.stability:
        report["stability"] = stability_with_progress(models, loader, sources, tokenizer.decode)
        print(format_stability(report["stability"]))
    write_atomically(json_out, json.dumps(report, indent=2) + "\n")
    write_csv_tables(report, page_out)
    print(
        f"moe-lab: wrote {write_analysis_page(report, page_out)}, {json_out} and the tables "
        f"{page_out.parent / (page_out.stem + '.*.csv')} ({', '.join(csv_paths(page_out))})",
        file=sys.stderr,
    )
    if wandb_node is not None:
        print(
            f"moe-lab: logged to W&B: {log_to_wandb(report, wandb_node, page_out.parent, f'analyze {sources[-1]}')}",
            file=sys.stderr,
        )
    return 0


def analyze_with_progress(
    models: list[MoETransformer], loader: Any, seq_len: int, domain_names: list[str], args: Any
) -> dict[str, Any]:
    """`analyze` with a progress line on stderr, and every token's routing to --trace if given."""
    final = models[-1]
    progress = progress_line("", len(loader.batch_sampler))
    trace = trace_writer(args.trace, final, domain_names) if args.trace is not None else None
    try:
        result = analyze(
            models,
            loader,
            final.cfg.vocab_size,
            len(domain_names),
            seq_len,
            progress=progress,
            trace=trace,
            capacity_factors=args.capacity_factor,
        )
    except BaseException:
        if trace is not None:
            trace.abandon()
        raise
    if trace is not None:
        trace.close()
    return result


def stability_with_progress(models: list[MoETransformer], loader: Any, sources: list[str], decode) -> dict[str, Any]:
    """`--stability` (moe_lab/tools/stability.py) over the same batches, with a progress line on stderr."""
    import sys

    progress = progress_line("stability, ", len(loader.batch_sampler))
    result = stability(models, loader, models[-1].cfg.vocab_size, sources, decode=decode, progress=progress)
    print(file=sys.stderr)
    return result


def progress_line(what: str, batches: int):
    """A progress(done, tokens) that rewrites one line on stderr: "moe-lab: WHATdone/batches batches, N tokens"."""
    import sys

    def progress(done: int, tokens: int) -> None:
        print(f"\rmoe-lab: {what}{done}/{batches} batches, {tokens:,} tokens", end="", file=sys.stderr, flush=True)

    return progress


def check_outputs(page: Path) -> Path:
    """UserError, before any work, if the page, its JSON or its CSV tables would replace a file moe-lab analyze did
    not write; returns the JSON's path."""
    from moe_lab.analysis.pages import checked_output

    checked_output(page)
    json_out = page.with_suffix(".json")
    if json_out.exists() and '"vocab_specialisation_input"' not in json_out.read_text(errors="ignore")[:100000]:
        raise UserError(f"{json_out} exists and was not written by moe-lab analyze; choose another -o")
    check_csv_outputs(page)
    return json_out


def wandb_settings(cfg: Any) -> Optional[dict[str, Any]]:
    """The W&B logger's settings of `logger=wandb` (None without it); an analysis logs beside its page."""
    if "wandb" not in cfg.logger:
        return None
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.logger.wandb, resolve=False)
    node.pop("save_dir", None)  # the run's directory
    return node


def load_models(sources: list[str], capacity: str, device: str) -> tuple[list[MoETransformer], Any, str]:
    """The checkpoints of one run, oldest first (the last is analysed), with the last one's tokenizer and name."""
    from moe_lab.tools.generate import load_for_inference

    loaded = [load_for_inference(source, capacity=capacity) for source in sources]
    models = [model.to(device).eval() for model, _, _ in loaded]
    final = models[-1]
    check_analysable(final)
    for model, source in zip(models[:-1], sources[:-1]):
        if model.moe_layers != final.moe_layers or [m.num_experts for m in model.moe_modules()] != [
            m.num_experts for m in final.moe_modules()
        ]:
            raise UserError(
                f"{source} has other MoE layers or experts than {sources[-1]}: saturation compares "
                "checkpoints of one run"
            )
    return models, loaded[-1][1], loaded[-1][2]
