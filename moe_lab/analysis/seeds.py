"""Runs that differ only in their seed, as groups: is a difference between configurations real, or noise?

`moe-lab train -m experts=e8,e16 seed=1,2,3` (or `seeds=3`) makes jobs that share every override but the seed; here
they become one group per configuration. Each metric gets the mean over the group's finished runs, the sample
standard deviation and the 95% t interval of the mean (`stats.mean_interval`); groups are ranked by mean validation
loss, and a group whose interval overlaps another's is marked, because these seeds do not establish their order.
Neighbours in the ranking get their difference with Welch's interval and p-value (`stats.difference_interval`) and,
when they share seeds, the paired interval over those seeds (`stats.paired_difference_interval`): a seed fixes the
initial weights and the data order, so pairing cancels the seed's own luck.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from moe_lab.analysis.runs import RunRecord, swept_keys, unescape_override
from moe_lab.analysis.stats import (
    CONFIDENCE,
    MAX_SEEDS,
    difference_interval,
    intervals_overlap,
    mean_interval,
    paired_difference_interval,
    resolvable_difference,
    seeds_to_resolve,
)
from moe_lab.files import write_atomically

SEED_KEY = "seed"
RANK_KEY = "val/loss"  # lower is better
# The metrics summarised per group: (key, column title, format).
GROUP_METRICS = [
    ("val/loss", "val/loss", ".4f"),
    ("val/loss_se", "held-out SE", ".4f"),  # the held-out set's own noise, beside the seeds' spread (std)
    ("moe/mean_imbalance", "imbalance", ".2f"),
    ("moe/min_load", "min load", ".2f"),
    ("moe/dropped_frac", "dropped", ".1%"),
    ("moe/dead_experts", "dead", ".1f"),
    ("moe/starved_experts", "starved", ".1f"),
    ("moe/specialization", "special.", ".3f"),
]


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


@dataclass
class RunGroup:
    """The runs of one configuration (every override but the seed equal)."""

    name: str
    runs: list[RunRecord]

    @property
    def seeds(self) -> list[str]:
        return [
            next((o.partition("=")[2] for o in run.overrides if _key(o) == SEED_KEY), "default") for run in self.runs
        ]

    @property
    def finished(self) -> list[RunRecord]:
        return [run for run in self.runs if run.status == "finished"]

    def values(self, key: str) -> list[float]:
        """The metric's final value per seed, finished runs only (runs without it left out): a seed run twice is one
        sample, since repeating a seed measures nothing of the spread over seeds."""
        return list(self.by_seed(key).values())

    @property
    def repeats(self) -> int:
        """How many runs repeat a seed another run of the group already has."""
        return len(self.seeds) - len(set(self.seeds))

    def one_run_per_seed(self) -> list[RunRecord]:
        """The finished runs, one per seed (of runs that repeat a seed, the last), as `by_seed` counts them."""
        last = {seed: run for run, seed in zip(self.runs, self.seeds) if run.status == "finished"}
        return list(last.values())

    def by_seed(self, key: str) -> dict[str, float]:
        """The metric's final value per seed, finished runs only."""
        out = {}
        for run, seed in zip(self.runs, self.seeds):
            value = run.final(key) if run.status == "finished" else None
            if value is not None and math.isfinite(value):
                out[seed] = value
        return out

    def interval(self, key: str) -> dict[str, float]:
        return mean_interval(self.values(key))


def seed_groups(runs: list[RunRecord]) -> list[RunGroup]:
    """The runs grouped by every override but `seed` (and Hydra's own), in order of first appearance; named by the
    overrides that differ between groups."""
    keys = [k for k in swept_keys(runs) if _key(k) != SEED_KEY]
    order: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        config = tuple(sorted(o for o in run.overrides if _key(o) != SEED_KEY and not o.startswith("hydra.")))
        order.setdefault(config, []).append(run)
    groups = []
    for members in order.values():
        given = dict(o.partition("=")[::2] for o in members[0].overrides)
        name = ", ".join(f"{k}={unescape_override(given[k])}" for k in keys if k in given) or "the defaults"
        groups.append(RunGroup(name, members))
    return groups


def configurations(n: int) -> str:
    return f"{n} configuration" + ("s" if n != 1 else "")


def has_seed_groups(groups: list[RunGroup]) -> bool:
    """Whether some configuration was run over more than one seed."""
    return any(len(set(g.seeds)) > 1 for g in groups)


@dataclass
class RankedGroup:
    rank: int
    group: RunGroup
    interval: dict[str, float]
    overlaps: list[int]  # ranks of the groups whose interval of RANK_KEY overlaps this one's

    @property
    def rank_text(self) -> str:
        return f"{self.rank}=" if self.overlaps else str(self.rank)


def ranked_groups(groups: list[RunGroup]) -> list[RankedGroup]:
    """Groups with a finished run, lowest mean validation loss first, each with the ranks it is not separated from
    (overlapping 95% intervals); groups with no finished run last, unranked."""
    scored = [(g.interval(RANK_KEY), g) for g in groups]
    done = sorted([(i, g) for i, g in scored if i["n"] > 0], key=lambda ig: ig[0]["mean"])
    ranked = [RankedGroup(r + 1, g, i, []) for r, (i, g) in enumerate(done)]
    for a in ranked:
        a.overlaps = [b.rank for b in ranked if b is not a and intervals_overlap(a.interval, b.interval)]
    return ranked


def _separated(d: dict[str, float]) -> bool:
    return math.isfinite(d["low"]) and (d["low"] > 0 or d["high"] < 0)


def differences(ranked: list[RankedGroup]) -> list[dict[str, Any]]:
    """Each group against the next in the ranking: the difference of mean validation loss with Welch's interval,
    and, where the two share seeds (a seed fixes the initial weights and the data order), the paired interval over
    those seeds."""
    out = []
    for a, b in zip(ranked, ranked[1:]):
        d = difference_interval(a.group.values(RANK_KEY), b.group.values(RANK_KEY))
        mine, theirs = a.group.by_seed(RANK_KEY), b.group.by_seed(RANK_KEY)
        shared = [seed for seed in mine if seed in theirs]
        paired = (
            paired_difference_interval([mine[s] for s in shared], [theirs[s] for s in shared])
            if len(shared) >= 2
            else None
        )
        entry = {
            "a": a,
            "b": b,
            **d,
            "separated": _separated(d),
            "paired": paired,
            "paired_separated": paired is not None and _separated(paired),
        }
        out.append(entry | seeds_needed(entry, a.group.values(RANK_KEY), b.group.values(RANK_KEY)))
    return out


def seeds_needed(d: dict[str, Any], a: list[float], b: list[float]) -> dict[str, Any]:
    """What these seeds could resolve and what the difference needs, from the paired spread where the groups share
    seeds (the seed's own luck cancels), else from the two groups' spreads: `resolvable`, the smallest difference of
    means these seeds separate (the interval's half-width); `seeds_needed`, for a difference not separated, the seeds
    per group with which one of the observed size would be (80% power; inf past MAX_SEEDS)."""
    paired = d["paired"] is not None and math.isfinite(d["paired"].get("std", float("nan")))
    if paired:
        spread, n = d["paired"]["std"], d["paired"]["n"]
    else:
        ia, ib = mean_interval(a), mean_interval(b)
        spread, n = math.sqrt((ia["std"] ** 2 + ib["std"] ** 2) / 2), min(ia["n"], ib["n"])
    separated = d["paired_separated"] if paired else d["separated"]
    diff = d["paired"]["diff"] if paired else d["diff"]  # the difference over the shared seeds, when paired
    needed = float("nan") if separated else seeds_to_resolve(diff, spread, paired)
    return {
        "resolvable": resolvable_difference(spread, n, paired),
        "seeds_needed": needed,
        "needs_from": "paired" if paired else "welch",
        "needs_diff": diff,
    }


def _number(value: float, spec: str) -> str:
    return format(value, spec) if value is not None and math.isfinite(value) else "n/a"


def group_table(groups: list[RunGroup]) -> str:
    """The plain-text table of the groups (printed at the end of a sweep and by `moe-lab dashboard`): rank ('='
    where the 95% interval overlaps another group's), runs, mean validation loss with its interval and standard
    deviation, the means of the routing metrics, and below it the differences between neighbours."""
    ranked = ranked_groups(groups)
    pct = int(round(CONFIDENCE * 100))
    header = (
        ["#", "group", "runs", f"val/loss [{pct}% CI]", "std"]
        + [t for k, t, _ in GROUP_METRICS[1:]]
        + ["not separated from"]
    )
    body = []
    for r in ranked:
        i = r.interval
        cells = [
            r.rank_text,
            r.group.name,
            _runs_text(r.group),
            f"{_number(i['mean'], '.4f')} [{_number(i['low'], '.4f')}, {_number(i['high'], '.4f')}]",
            _number(i["std"], ".4f"),
        ]
        for key, _, spec in GROUP_METRICS[1:]:
            mean = r.group.interval(key)["mean"]
            flagged = key in ("moe/dead_experts", "moe/starved_experts") and math.isfinite(mean) and mean > 0
            cells.append(_number(mean, spec) + ("!" if flagged else ""))
        cells.append(", ".join(f"#{o}" for o in r.overlaps))
        body.append(cells)
    for g in groups:
        if not g.finished:
            body.append(["-", g.name, _runs_text(g), "no finished run", ""] + [""] * (len(GROUP_METRICS) - 1) + [""])
    widths = [max(len(row[c]) for row in [header] + body) for c in range(len(header))]
    left = {1, len(header) - 1}
    lines = [
        "  ".join(c.ljust(w) if k in left else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in [header] + body
    ]
    diffs = differences(ranked)
    if diffs:
        lines.append(f"differences in mean val/loss, each group against the next (Welch's t, {pct}% CI):")
        for d in diffs:
            lines.append(f"  #{d['a'].rank} - #{d['b'].rank}: {difference_text(d)}")
    if any(r.overlaps for r in ranked):
        lines.append(f"'=': its {pct}% interval overlaps another group's; these seeds do not establish that order")
    if any(len(g.values(RANK_KEY)) < 2 for g in groups if g.finished):
        lines.append("n/a: a group with one finished seed has no interval; add seeds (seed=1,2,3 or seeds=3)")
    if any(g.repeats for g in groups):
        lines.append("'+N rep.': runs that repeat a seed of their group; each seed counts once in the interval")
    return "\n".join(lines)


def difference_text(d: dict[str, Any]) -> str:
    """One entry of `differences` in words: Welch's interval and p-value, and the paired one where there is one."""
    verdict = "separated" if d["separated"] else "not separated: the interval contains 0"
    return (
        f"{_number(d['diff'], '+.4f')} [{_number(d['low'], '+.4f')}, {_number(d['high'], '+.4f')}], "
        f"p = {_number(d['p'], '.3g')} ({verdict})"
        + (f"; paired by seed: {_paired_text(d)}" if d["paired"] else "")
        + _needs_text(d)
    )


def _needs_text(d: dict[str, Any]) -> str:
    """'; these seeds resolve differences above 0.0443 (paired); to separate -0.0282: about 6 seeds per group (80%
    power)', the second part only for a difference not separated."""
    if "resolvable" not in d or not math.isfinite(d["resolvable"]):
        return ""
    text = f"; these seeds resolve differences above {d['resolvable']:.4f} ({d['needs_from']})"
    needed = d["seeds_needed"]
    if math.isnan(needed):
        return text
    count = f"about {int(needed)} seeds per group" if math.isfinite(needed) else f"more than {MAX_SEEDS} seeds"
    return text + f"; to separate {d['needs_diff']:+.4f}: {count} (80% power)"


def _paired_text(d: dict[str, Any]) -> str:
    p = d["paired"]
    verdict = "separated" if d["paired_separated"] else "not separated"
    return (
        f"{_number(p['diff'], '+.4f')} [{_number(p['low'], '+.4f')}, {_number(p['high'], '+.4f')}] over "
        f"{p['n']} seeds, p = {_number(p['p'], '.3g')} ({verdict})"
    )


def _runs_text(group: RunGroup) -> str:
    done = len(group.finished)
    text = f"{done}" if done == len(group.runs) else f"{done}/{len(group.runs)}"
    return text + (f" +{group.repeats} rep." if group.repeats else "")


GROUP_CSV_COLUMNS = (
    ["rank", "group", "runs", "finished", "seeds"]
    + [f"{key}:{stat}" for key, _, _ in GROUP_METRICS for stat in ("mean", "std", "ci_low", "ci_high")]
    + ["not_separated_from", "diff_to_next", "diff_low", "diff_high", "diff_from", "resolvable", "seeds_needed"]
    + ["run_dirs"]
)


def _difference_columns(d: Optional[dict[str, Any]]) -> dict[str, Any]:
    """sweep_groups.csv's columns of a group's difference to the next group (paired where they share seeds)."""
    if d is None:
        return {}
    interval = d["paired"] if d["needs_from"] == "paired" else d
    finite = lambda v: v if v is not None and math.isfinite(v) else ""  # noqa: E731
    needed = d["seeds_needed"]
    return {
        "diff_to_next": finite(interval["diff"]),
        "diff_low": finite(interval["low"]),
        "diff_high": finite(interval["high"]),
        "diff_from": d["needs_from"],
        "resolvable": finite(d["resolvable"]),
        "seeds_needed": "" if math.isnan(needed) else (int(needed) if math.isfinite(needed) else f">{MAX_SEEDS}"),
    }


def group_rows(groups: list[RunGroup]) -> list[dict[str, Any]]:
    rows = []
    ranked = ranked_groups(groups)
    to_next = {id(d["a"]): d for d in differences(ranked)}
    for r in ranked:
        row: dict[str, Any] = {
            "rank": r.rank,
            "group": r.group.name,
            "runs": len(r.group.runs),
            "finished": len(r.group.finished),
            "seeds": " ".join(r.group.seeds),
            "not_separated_from": " ".join(str(o) for o in r.overlaps),
            **_difference_columns(to_next.get(id(r))),
            "run_dirs": " ".join(str(run.path) for run in r.group.runs),
        }
        for key, _, _ in GROUP_METRICS:
            i = r.group.interval(key)
            for stat, value in (("mean", i["mean"]), ("std", i["std"]), ("ci_low", i["low"]), ("ci_high", i["high"])):
                row[f"{key}:{stat}"] = value if math.isfinite(value) else ""
        rows.append(row)
    return rows


def write_group_summary(sweep_dir: Path, runs: list[RunRecord]) -> Optional[Path]:
    """sweep_groups.csv beside sweep_summary.csv when the sweep repeated seeds: one row per configuration, best mean
    validation loss first, with each metric's mean, standard deviation and 95% interval."""
    groups = seed_groups(runs)
    if not has_seed_groups(groups):
        return None
    out = sweep_dir / "sweep_groups.csv"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=GROUP_CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(group_rows(groups))
    write_atomically(out, text.getvalue())
    return out
