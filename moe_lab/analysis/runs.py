"""Reading run directories back, and the sweep summary (`sweep_summary.csv`).

A run directory holds `.hydra/overrides.yaml`, `metrics.csv`, `routing.jsonl` and `summary.json` (and, for a run
resumed from a checkpoint, `resumed_from.json`, which names the run before it); a sweep directory
holds one run directory per job (`0/`, `1/`, ...) and Hydra's `multirun.yaml`. `sweep_summary.csv` gathers each
job's final metrics and overrides, sorted by validation loss.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from moe_lab.errors import DashboardError
from moe_lab.files import write_atomically

SUMMARY_COLUMNS = [
    "job",
    "status",
    "val/loss",
    "initial_val_loss",
    "train/loss",
    "moe/mean_imbalance",
    "moe/max_imbalance",
    "moe/min_load",
    "moe/dropped_frac",
    "moe/dead_experts",
    "moe/starved_experts",
    "moe/specialization",
    "moe/experts_per_token",
    "tokens_per_sec_run",  # the run's average: training tokens over training seconds (validation excluded)
    "train/tokens_per_sec",  # the last logging window's
    "train/mfu",
    "step",
    "seconds",
    "overrides",
    "run_dir",
    "checkpoint",
    "error",
]
RESUMED_FROM = "resumed_from.json"


@dataclass
class RunRecord:
    path: Path
    overrides: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, float]] = field(default_factory=list)  # metrics.csv rows
    routing: list[dict] = field(default_factory=list)  # routing.jsonl lines
    # A resumed run's metrics and routing start with those of the runs before it, up to the step each resumed
    # from; `earlier` names those runs (oldest first) and `gap` what could not be read.
    earlier: list[tuple[Path, int]] = field(default_factory=list)
    gap: str = ""
    damaged: str = ""  # why an earlier run's files could not be read (its curves are left out; this run's are whole)
    name: str = ""  # how pages name the run (default: its directory's name)

    @property
    def status(self) -> str:
        """finished, interrupted, diverged or running; "failed" for a sweep job that failed (its error.txt says
        why, a diverged job's included)."""
        if (self.path / "error.txt").exists():
            return "failed"
        if self.summary:
            return self.summary.get("status", "finished")
        return "running"

    @property
    def error(self) -> str:
        path = self.path / "error.txt"
        return path.read_text().strip() if path.exists() else ""

    @property
    def job(self) -> str:
        return self.name or self.path.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        rows = [(int(r["step"]), r[key]) for r in self.metrics if key in r]
        return [s for s, _ in rows], [v for _, v in rows]

    def final(self, key: str) -> Optional[float]:
        if key in self.summary and isinstance(self.summary[key], (int, float)):
            return float(self.summary[key])
        _, values = self.series(key)
        return values[-1] if values else None


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.csv").exists() or (path / "summary.json").exists() or (path / ".hydra").is_dir()


def is_sweep_dir(path: Path) -> bool:
    """Hydra's multirun.yaml, or job folders named by their numbers (0/, 1/, ...): a sweep, not any folder of runs."""
    if (path / "multirun.yaml").exists():
        return True
    jobs = run_folders(path)
    return bool(jobs) and all(p.name.isdigit() for p in jobs)


def run_folders(path: Path) -> list[Path]:
    """The run directories directly inside `path` (a date folder of runs, a sweep's jobs)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))


def read_run(path: Path, _seen: Optional[set] = None) -> RunRecord:
    """A run directory's files, with the curves of the runs it was resumed from before its own. A running or killed
    run may leave a cut-off last line in routing.jsonl: it is skipped. Any other damage is a DashboardError naming
    the file."""
    record = RunRecord(path=path)
    overrides = path / ".hydra" / "overrides.yaml"
    if overrides.exists():
        loaded = _read(overrides, lambda text: yaml.safe_load(text) or [])
        if not isinstance(loaded, list):
            raise DashboardError(f"{overrides} is damaged (not a list of overrides); restore or delete it")
        record.overrides = [str(o) for o in loaded]
    if (path / "summary.json").exists():
        summary = _read(path / "summary.json", json.loads)
        if not isinstance(summary, dict):
            raise DashboardError(f"{path / 'summary.json'} is damaged (not a JSON object); restore or delete it")
        record.summary = summary
    if (path / "metrics.csv").exists():
        record.metrics = _read(path / "metrics.csv", _metric_rows)
    if (path / "routing.jsonl").exists():
        record.routing = _read(path / "routing.jsonl", _routing_records)
    if (path / RESUMED_FROM).exists():
        _prepend_earlier(record, _read(path / RESUMED_FROM, json.loads), _seen or set())
    return record


def _prepend_earlier(record: RunRecord, origin: Any, seen: set) -> None:
    """Put the curves of the run that `record` was resumed from (its resumed_from.json: step and run_dir) in front
    of its own, up to the step it resumed from; recursively, for a run resumed more than once."""
    if not isinstance(origin, dict) or not isinstance(origin.get("step"), int):
        raise DashboardError(f"{record.path / RESUMED_FROM} is damaged (no step); restore or delete it")
    step, earlier_dir = origin["step"], origin.get("run_dir")
    where = Path(earlier_dir) if isinstance(earlier_dir, str) else None
    seen = seen | {record.path.resolve()}
    if where is None or not is_run_dir(where) or where.resolve() in seen:
        record.gap = (
            f"steps 0-{step} were trained by {earlier_dir or 'a run whose directory is unknown'}, "
            "which is gone: its curves are missing here"
        )
        return
    try:
        earlier = read_run(where, seen)
    except DashboardError as e:  # the earlier run's damage is its own: this run's row and curves stay right
        record.damaged = str(e)
        record.gap = (
            f"steps 0-{step} were trained by {earlier_dir}, whose files are damaged: its curves are missing here"
        )
        return
    record.earlier = earlier.earlier + [(where, step)]
    record.gap, record.damaged = earlier.gap, earlier.damaged
    record.metrics = [r for r in earlier.metrics if r["step"] <= step] + record.metrics
    record.routing = [r for r in earlier.routing if r.get("step", 0) <= step] + record.routing
    if record.summary and record.summary.get("initial_val_loss") is None:
        initial = earlier.summary.get("initial_val_loss")
        if initial is not None:
            record.summary["initial_val_loss"] = initial


def _read(file: Path, parse):
    try:
        return parse(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DashboardError(f"{file} is damaged (not UTF-8 text); restore or delete it") from None
    except (ValueError, yaml.YAMLError, csv.Error) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DashboardError(f"{file} is damaged ({reason}); restore or delete it") from None
    except OSError as e:
        raise DashboardError(f"{file} cannot be read ({e.strerror})") from None


def _metric_rows(text: str) -> list[dict[str, float]]:
    if "\x00" in text:
        raise ValueError("it holds binary data")
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        parsed = {}
        for k, v in row.items():
            if k is not None and v not in ("", None):
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    pass
        if "step" in parsed:
            rows.append(parsed)
    return rows


def _routing_records(text: str) -> list[dict]:
    lines = [line for line in text.split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break  # the last line of a run that is still writing, or was killed mid-write
            raise ValueError(f"line {i + 1} is not JSON") from None
        problem = _routing_shape(record)
        if problem:
            raise ValueError(f"line {i + 1} is not a routing record: {problem}")
        records.append(record)
    return records


def _routing_shape(record: Any) -> str:
    """What is wrong with a routing.jsonl record's shape ('' if nothing): {"step": int, "layers": [{"layer": int,
    "load": [numbers], "domain_counts": [[numbers]]?}], "domains": [str]?}, as training/metrics.py writes it."""

    def numbers(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)

    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("step"), int):
        return "no integer 'step'"
    if not isinstance(record.get("layers"), list):
        return "no list of 'layers'"
    for entry in record["layers"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("layer"), int) or not numbers(entry.get("load")):
            return "a layer without an integer 'layer' and a list of numbers 'load'"
        counts = entry.get("domain_counts")
        if counts is not None and not (isinstance(counts, list) and all(numbers(row) for row in counts)):
            return "'domain_counts' is not a table of numbers"
    if "domains" in record and not (
        isinstance(record["domains"], list) and all(isinstance(d, str) for d in record["domains"])
    ):
        return "'domains' is not a list of names"
    return ""


def damaged_earlier_lines(runs: list[RunRecord]) -> list[str]:
    """One line for each run whose earlier run (the attempt it was resumed from) could not be read."""
    return [
        f"moe-lab: warning: {run.job} was resumed from a run whose files are damaged, and its curves before that are "
        f"left out: {run.damaged}"
        for run in runs
        if run.damaged
    ]


def sweep_runs(path: Path) -> list[RunRecord]:
    jobs = [p for p in path.iterdir() if p.is_dir() and is_run_dir(p)]
    jobs.sort(key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    return [read_run(p) for p in jobs]


def gather_runs(paths: list[Path]) -> list[RunRecord]:
    """The runs of any mix of run and sweep directories (a sweep gives all its jobs), each once, named by its path
    below the folder the paths share (`multirun/A/0`, `multirun/B/3`), so runs of different sweeps never collide."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise DashboardError(
                f"{path}: no such directory (give run directories such as outputs/DATE/TIME, or "
                "sweep directories such as outputs/multirun/DATE/TIME)"
            )
        if is_run_dir(path) and (path / "metrics.csv").exists():
            found.append(path)
        elif is_sweep_dir(path) or run_folders(path):  # a sweep, or a folder of runs named to be compared
            found += [run.path for run in sweep_runs(path)]
        else:
            raise DashboardError(f"{path} is neither a run directory (with metrics.csv) nor a sweep directory")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise DashboardError("the directories hold no runs yet")
    base = Path(os.path.commonpath(unique)) if len(unique) > 1 else unique[0].parent
    if base in unique:
        base = base.parent
    runs = [read_run(p) for p in unique]
    for run in runs:
        run.name = str(run.path.relative_to(base))
    return runs


def swept_keys(runs: list[RunRecord]) -> list[str]:
    """Override keys whose values differ between the runs (the sweep's axes), in command-line order."""
    values: dict[str, set] = {}
    order: list[str] = []
    for run in runs:
        for o in run.overrides:
            key, _, value = o.partition("=")
            if key.startswith("hydra."):
                continue
            if key not in values:
                values[key] = set()
                order.append(key)
            values[key].add(value)
    return [k for k in order if len(values[k]) > 1 or any(k not in dict(_split(r)) for r in runs)]


def _split(run: RunRecord) -> list[tuple[str, str]]:
    return [tuple(o.partition("=")[::2]) for o in run.overrides]


def unescape_override(value: str) -> str:
    """An override value as the user typed it: Hydra records a swept value with its grammar's escapes
    (`dense/$\\{seed\\}/...` for `dense/${seed}/...`)."""
    return re.sub(r"\\([\\()\[\]{}:=, ])", r"\1", value)


def label(run: RunRecord, keys: list[str]) -> str:
    given = dict(_split(run))
    parts = [f"{k}={unescape_override(given[k])}" for k in keys if k in given]
    return ", ".join(parts) or run.job


def labels(runs: list[RunRecord]) -> list[str]:
    """One distinct name per run, from the overrides that differ between them (the job's name where they tie)."""
    keys = swept_keys(runs)
    names = [label(run, keys) for run in runs]
    return [f"{name} ({run.job})" if names.count(name) > 1 else name for name, run in zip(names, runs)]


# The ranked table printed in the terminal at the end of a sweep and by `moe-lab dashboard RUN1 RUN2 ...`.
TABLE_COLUMNS = [
    ("val/loss", "val/loss", ".4f"),
    ("moe/mean_imbalance", "imbalance", ".2f"),
    ("moe/min_load", "min load", ".2f"),
    ("moe/dropped_frac", "dropped", ".1%"),
    ("moe/dead_experts", "dead", ".0f"),
    ("moe/starved_experts", "starved", ".0f"),
    ("moe/specialization", "special.", ".3f"),
    ("moe/experts_per_token", "experts/tok", ".2f"),
    ("tokens_per_sec_run", "tokens/s avg", ",.0f"),  # the run's average, as its own summary says
]


def ranked_table(runs: list[RunRecord]) -> str:
    """The runs as a plain-text table, best validation loss first (summary_rows' order): rank, run, final metrics,
    status, with a '!' after dead or starved expert counts."""
    names = dict(zip((run.job for run in runs), labels(runs)))
    header = ["#", "run"] + [title for _, title, _ in TABLE_COLUMNS] + ["status"]
    body = []
    for rank, row in enumerate(summary_rows(runs), 1):
        cells = [str(rank), names[row["job"]]]
        for key, _, spec in TABLE_COLUMNS:
            value = row[key]
            text = format(value, spec) if isinstance(value, float) and not math.isnan(value) else "n/a"
            flagged = key in ("moe/dead_experts", "moe/starved_experts") and isinstance(value, float) and value > 0
            cells.append(text + ("!" if flagged else ""))
        body.append(cells + [row["status"]])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (1, len(header) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in [header] + body
    ]
    return "\n".join(lines)


def summary_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "job": run.job,
            "status": run.status,
            "overrides": " ".join(run.overrides),
            "run_dir": str(run.path),
        }
        for key in SUMMARY_COLUMNS:
            if key not in row:
                value = run.final(key)
                row[key] = value if value is not None else ""
        if run.status != "finished" and run.summary.get("val_step") != run.summary.get("step"):
            row["val/loss"] = ""  # its last validation is not its final state (often step 0's): no final loss
        row["checkpoint"] = str(run.summary.get("checkpoint") or "")
        row["error"] = (
            (run.error or str(run.summary.get("error") or "")).splitlines()[0]
            if (run.error or run.summary.get("error"))
            else ""
        )
        rows.append(row)
    # Finished runs by validation loss; then interrupted, running and failed ones (their figures are the last seen).
    order = {"finished": 0, "interrupted": 1, "running": 2, "diverged": 3, "failed": 3}
    rows.sort(
        key=lambda r: (
            order.get(r["status"], 4),
            not isinstance(r["val/loss"], float) or math.isnan(r["val/loss"]),
            r["val/loss"] if isinstance(r["val/loss"], float) else 0.0,
        )
    )
    return rows


def write_sweep_summary(sweep_dir: Path, not_started: tuple[dict, ...] | list[dict] = ()) -> Path:
    """sweep_summary.csv: one row per job, best validation loss first, then stopped, failed and (given by the
    caller, who knows the sweep's plan) not-started jobs, each with its state, step, checkpoint and error."""
    rows = summary_rows(sweep_runs(sweep_dir)) + [{k: row.get(k, "") for k in SUMMARY_COLUMNS} for row in not_started]
    out = sweep_dir / "sweep_summary.csv"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(out, text.getvalue())
    return out
