"""Score each checkpoint's experts by every pruning criterion on the even held-out batches (the embedded corpus, the
model's tokenizer, dropless), prune to each --keep, and measure the held-out loss on the odd batches: one CSV row per
(checkpoint, criterion, keep, budget). `--summarise CSV...` prints the tables of the README (means over seeds with 95%
t intervals, each criterion against random and frequency, and a total budget against the same number per layer,
paired by checkpoint).

`--budget total` keeps keep x layers experts over all the MoE layers (`moe-lab prune --keep-total`: each layer's
fewest, then the best of any layer by a score comparable across layers) instead of `keep` in every layer.

    python prune_eval.py --keep 6 4 2 --out results/tiny.csv CKPT [CKPT ...]
    python prune_eval.py --keep 6 4 2 --budget per_layer total --out results/tiny_total.csv CKPT [CKPT ...]
    python prune_eval.py --summarise results/tiny.csv [...]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

from moe_lab.analysis.stats import mean_interval, paired_difference_interval
from moe_lab.cli.preflight import compose_checked
from moe_lab.model.pruning import prune_experts
from moe_lab.tools.evaluate import held_out_data
from moe_lab.tools.generate import load_for_inference
from moe_lab.tools.prune import (
    CRITERIA,
    comparable,
    experts_to_keep,
    experts_to_keep_total,
    fewest_experts,
    held_out_loss,
    scores,
)

COLUMNS = [
    *("checkpoint", "model", "criterion", "kept", "experts", "budget", "per_layer"),
    *("loss", "loss_unpruned", "seconds"),
]


def kept_experts(model, criterion: str, scores_LE, keep: int, budget: str) -> list[list[int]]:
    """Each layer's experts to keep: `keep` in every layer, or keep x layers in all (a total budget)."""
    groups = model.moe_modules()[0].router.cfg.expert_groups()
    if budget == "per_layer":
        return experts_to_keep(scores_LE, keep, groups)
    minimum_L = [fewest_experts(moe) for moe in model.moe_modules()]
    return experts_to_keep_total(comparable(criterion, scores_LE), keep * len(model.moe_layers), minimum_L)


def evaluate(checkpoints: list[str], keeps: list[int], out: Path, budgets: list[str]) -> None:
    cfg = compose_checked([], ("data",), "prune_eval", "data=...")
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for n, ckpt in enumerate(checkpoints):
            model, tokenizer, _ = load_for_inference(ckpt)
            _, _, loader = held_out_data(cfg, tokenizer, model.cfg, None)
            blocks = [b["input_ids"][b["valid"].bool()] for b in loader]
            blocks = [b for b in blocks if len(b)]
            calibration, held_out = blocks[0::2], blocks[1::2]
            unpruned = held_out_loss(model, held_out)
            groups = model.moe_modules()[0].router.cfg.expert_groups()
            for criterion in CRITERIA:
                if criterion == "loss" and groups > 1:
                    continue  # removing one expert leaves the groups unequal: moe-lab refuses it
                started = time.perf_counter()
                scores_LE = scores(criterion, model, calibration, seed=n)
                seconds = time.perf_counter() - started
                for keep in keeps:
                    for budget in budgets if groups == 1 else ["per_layer"]:  # groups stay whole: per layer only
                        kept = kept_experts(model, criterion, scores_LE, keep, budget)
                        pruned = prune_experts(model, dict(zip(model.moe_layers, kept)))
                        row = {
                            "checkpoint": ckpt,
                            "model": model.cfg.name,
                            "criterion": criterion,
                            "kept": keep,
                            "experts": model.cfg.moe.num_experts,
                            "budget": budget,
                            "per_layer": " ".join(str(len(k)) for k in kept),
                            "loss": held_out_loss(pruned, held_out),
                            "loss_unpruned": unpruned,
                            "seconds": round(seconds, 2),
                        }
                        writer.writerow(row)
                        f.flush()
                        print(
                            f"{ckpt} {criterion} keep {keep} {budget} ({row['per_layer']}): {row['loss']:.4f} "
                            f"(unpruned {unpruned:.4f})",
                            flush=True,
                        )


def summarise(paths: list[str]) -> None:
    for path in paths:
        rows = list(csv.DictReader(open(path)))
        by = defaultdict(dict)  # (kept, criterion) -> checkpoint -> loss increase, keep in every layer
        total = defaultdict(dict)  # the same with keep x layers over all layers
        for r in rows:
            into = total if r.get("budget") == "total" else by
            into[(int(r["kept"]), r["criterion"])][r["checkpoint"]] = float(r["loss"]) - float(r["loss_unpruned"])
        experts = rows[0]["experts"]
        print(f"\n{path}: held-out loss increase over the unpruned model (mean [95% CI] over seeds)")
        print(f"  {'kept':>9}  {'criterion':<10} {'increase':>28}  {'minus random':>30}  {'minus frequency':>30}")
        for kept in sorted({k for k, _ in by}, reverse=True):
            for criterion in CRITERIA:
                if (kept, criterion) in by:
                    print(f"  {kept:>3} of {experts:<3}  {criterion:<10} " + row(by, kept, criterion))
        if total:
            print("\n  a total budget of kept x layers, minus the same kept in every layer (paired by checkpoint)")
            for kept in sorted({k for k, _ in total}, reverse=True):
                for criterion in CRITERIA:
                    if (kept, criterion) in total:
                        d, base = total[(kept, criterion)], by[(kept, criterion)]
                        keys = sorted(d)
                        m = mean_interval(list(d.values()))
                        p = paired_difference_interval([d[k] for k in keys], [base[k] for k in keys])
                        print(
                            f"  {kept:>3} of {experts:<3}  {criterion:<10} {m['mean']:+.4f} [{m['low']:+.4f}, "
                            f"{m['high']:+.4f}]  {p['diff']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]"
                        )
        print()


def row(by: dict, kept: int, criterion: str) -> str:
    """The criterion's mean increase, and its paired differences with random and with frequency (per checkpoint)."""
    d = by[(kept, criterion)]
    m = mean_interval(list(d.values()))
    cells = [f"{m['mean']:+.4f} [{m['low']:+.4f}, {m['high']:+.4f}]"]
    for baseline in ("random", "frequency"):
        if criterion == baseline:
            cells.append(" " * 28)
            continue
        other, keys = by[(kept, baseline)], sorted(d)
        p = paired_difference_interval([d[k] for k in keys], [other[k] for k in keys])
        cells.append(f"{p['diff']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]")
    return "  ".join(cells)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--keep", type=int, nargs="+", default=[])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget", nargs="+", choices=["per_layer", "total"], default=["per_layer"])
    parser.add_argument("--summarise", nargs="+")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.summarise)
        sys.exit(0)
    evaluate(args.checkpoints, args.keep, args.out, args.budget)
