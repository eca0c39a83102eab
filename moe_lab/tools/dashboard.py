"""`moe-lab dashboard PATH [PATH ...]`: the page of a run or a sweep, or runs and sweeps side by side.

The pages are drawn by `moe_lab/analysis/pages.py`; this is the command around them: one page, or a comparison
whose ranked table is also printed, once or kept up to date (`--live`), with the seed groups' table when the runs
differ only in their seeds. A sweep's sweep_summary.csv and sweep_groups.csv are rebuilt from its job folders each time
its page is (a sweep on SLURM outlives the process that submitted it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from moe_lab.analysis.pages import live, write_comparison, write_dashboard
from moe_lab.analysis.runs import damaged_earlier_lines, is_sweep_dir, ranked_table, sweep_runs
from moe_lab.analysis.seeds import configurations, group_table, has_seed_groups, seed_groups
from moe_lab.training.sweeps import write_sweep_files


def run(args: Any) -> int:
    """With its parsed arguments (moe_lab/cli/commands.py): paths, output (for one path, None is PATH/dashboard.html),
    live, interval."""
    single = len(args.paths) == 1

    def write(refresh):
        if single:
            return write_dashboard(args.paths[0], args.output, refresh=refresh)
        return write_comparison(args.paths, args.output, refresh=refresh)[0]

    if args.live:
        live(write, args.interval)
        return 0
    if single:
        path = Path(args.paths[0])
        sweep = path.is_dir() and is_sweep_dir(path)
        written = write_sweep_files(path) if sweep else []  # rebuilt from the job folders whenever read
        out = write(None)
        runs = sweep_runs(path) if sweep else []
        if runs:
            print(ranked_table(runs))
        for summary in written:
            print(f"moe-lab: wrote {summary}")
    else:
        out, runs = write_comparison(args.paths, args.output)
        print(ranked_table(runs))
    for line in damaged_earlier_lines(runs):
        print(line, file=sys.stderr)
    groups = seed_groups(runs)
    if has_seed_groups(groups):
        print(f"{configurations(len(groups))} over seeds, best mean validation loss first:\n{group_table(groups)}")
    print(f"moe-lab: wrote {out}")
    return 0
