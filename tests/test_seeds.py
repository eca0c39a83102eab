"""Seeds as a sweep axis: groups of runs that differ only in their seed, their intervals, and when two
configurations are (not) told apart. Known answers are computed by hand from textbook quantiles."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from moe_lab.analysis.runs import RunRecord
from moe_lab.analysis.seeds import group_table, has_seed_groups, ranked_groups, seed_groups
from moe_lab.analysis.stats import difference_interval, intervals_overlap, mean_interval

# Student's t, 97.5% quantile, by degrees of freedom (from tables)
T_975 = {2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582}


def test_mean_interval_of_known_values():
    i = mean_interval([1.0, 2.0, 3.0])
    assert i["n"] == 3 and i["mean"] == 2.0 and i["std"] == pytest.approx(1.0)
    assert i["half"] == pytest.approx(T_975[2] / math.sqrt(3), rel=1e-6)
    assert (i["low"], i["high"]) == pytest.approx((2 - i["half"], 2 + i["half"]))
    one = mean_interval([1.5])
    assert one["mean"] == 1.5 and math.isnan(one["half"])
    assert intervals_overlap(one, i)  # no interval: nothing separates them


def test_welch_difference_by_hand():
    a, b = [1.0, 1.2, 1.4, 1.6], [2.0, 2.1, 2.2]
    d = difference_interval(a, b)
    va, vb = 0.2**2 * 5 / 3, 0.1**2  # sample variances
    se = math.sqrt(va / 4 + vb / 3)
    dof = (va / 4 + vb / 3) ** 2 / ((va / 4) ** 2 / 3 + (vb / 3) ** 2 / 2)  # Welch-Satterthwaite
    assert dof == pytest.approx(0.02**2 / (0.04 / 432 + 0.0001 / 18), rel=1e-9)  # 4.075
    assert d["diff"] == pytest.approx(1.3 - 2.1)
    from scipy import stats

    half = stats.t.ppf(0.975, dof) * se
    assert (d["low"], d["high"]) == pytest.approx((d["diff"] - half, d["diff"] + half))
    assert T_975[5] < stats.t.ppf(0.975, dof) < T_975[4]  # between the tabled quantiles of 5 and 4 dof
    assert d["p"] < 0.01


def test_paired_difference_by_hand():
    """Pairs (1.0, 0.9), (2.0, 1.88), (3.0, 2.92): differences 0.10, 0.12, 0.08, mean 0.10, std 0.02; the seeds' large
    spread (1 to 3) cancels, which Welch's test cannot see."""
    from moe_lab.analysis.stats import paired_difference_interval

    d = paired_difference_interval([1.0, 2.0, 3.0], [0.9, 1.88, 2.92])
    half = T_975[2] * 0.02 / math.sqrt(3)
    assert d["n"] == 3 and d["diff"] == pytest.approx(0.1)
    assert (d["low"], d["high"]) == pytest.approx((0.1 - half, 0.1 + half))
    assert d["low"] > 0 and difference_interval([1.0, 2.0, 3.0], [0.9, 1.88, 2.92])["low"] < 0


def fake_run(tmp_path: Path, name: str, overrides: list[str], loss: float, status: str = "finished") -> RunRecord:
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return RunRecord(
        tmp_path / name, overrides=overrides, summary={"status": status, "val/loss": loss, "moe/mean_imbalance": 1.2}
    )


def test_groups_rank_and_say_which_are_not_separated(tmp_path):
    runs = []
    values = {"experts=e4": [2.00, 2.01, 2.02], "experts=e8": [1.90, 1.91, 1.92], "experts=e16": [1.92, 1.93, 1.94]}
    for config, losses in values.items():
        for seed, loss in enumerate(losses, 1):
            runs.append(fake_run(tmp_path, f"{config}-{seed}", [config, f"seed={seed}", "trainer.max_steps=9"], loss))
    runs.append(fake_run(tmp_path, "e4-failed", ["experts=e4", "seed=4", "trainer.max_steps=9"], 9.0, "failed"))
    groups = seed_groups(runs)
    assert has_seed_groups(groups) and [g.name for g in groups] == ["experts=e4", "experts=e8", "experts=e16"]
    assert groups[0].seeds == ["1", "2", "3", "4"] and len(groups[0].finished) == 3
    ranked = ranked_groups(groups)
    assert [(r.group.name, r.rank_text) for r in ranked] == [
        ("experts=e8", "1="),
        ("experts=e16", "2="),
        ("experts=e4", "3"),
    ]
    assert ranked[0].overlaps == [2] and ranked[2].overlaps == []
    assert ranked[2].interval["mean"] == pytest.approx(2.01)  # the failed seed is not counted
    table = group_table(groups)
    assert "3/4" in table and "not separated: the interval contains 0" in table and "'='" in table
    assert "#2 - #3" in table and "(separated)" in table
    assert table.count("paired by seed") == 2  # the groups share seeds 1-3 (e4's failed seed 4 is not counted)
    assert "over 3 seeds" in table


def test_group_names_show_overrides_as_typed(tmp_path):
    """Hydra records a swept `${seed}` interpolation escaped (`$\\{seed\\}`); the group's name shows what was typed."""
    runs = [
        fake_run(tmp_path, f"{kind}-{seed}", overrides + [f"seed={seed}"], 1.8 + 0.01 * seed)
        for seed in (1, 2)
        for kind, overrides in (
            ("up", [r"model.init_from=dense/$\{seed\}/last.ckpt", "upcycle=copy"]),
            ("scratch", ["upcycle=none"]),
        )
    ]
    names = {g.name for g in seed_groups(runs)}
    assert "model.init_from=dense/${seed}/last.ckpt, upcycle=copy" in names


def test_one_run_per_configuration_is_not_a_seed_group(tmp_path):
    runs = [fake_run(tmp_path, "a", ["experts=e4"], 2.0), fake_run(tmp_path, "b", ["experts=e8"], 1.9)]
    assert not has_seed_groups(seed_groups(runs))


def test_seeds_shorthand_expands_to_a_multirun():
    from moe_lab.cli.hydra_args import expand_seeds
    from moe_lab.errors import UserError

    assert expand_seeds(["experts=e4,e8", "seeds=3"]) == ["-m", "experts=e4,e8", "seed=1234,1235,1236"]
    assert expand_seeds(["-m", "seed=7", "seeds=2"]) == ["-m", "seed=7,8"]
    assert expand_seeds(["experts=e4"]) == ["experts=e4"]
    for bad in (["seeds=0"], ["seeds=x"], ["seeds=2", "seed=1,2"], ["seeds=2", "seeds=3"]):
        with pytest.raises(UserError):
            expand_seeds(bad)


@pytest.mark.slow
def test_a_seed_sweep_prints_groups_and_draws_error_bars(tmp_path, cache_dir):
    from test_dashboard import ARTIFACTS, render

    from conftest import FAST, run_cli

    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "train",
            "experts=e4,e8",
            "seeds=2",
            *FAST,
            f"paths.cache_dir={cache_dir}",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 configurations over seeds" in result.stdout and "val/loss [95% CI]" in result.stdout
    rows = list(csv.DictReader(open(sweep / "sweep_groups.csv")))
    assert sorted(r["group"] for r in rows) == ["experts=e4", "experts=e8"]
    assert all(r["finished"] == "2" and r["seeds"] == "1234 1235" for r in rows)
    for r in rows:
        assert float(r["val/loss:ci_low"]) <= float(r["val/loss:mean"]) <= float(r["val/loss:ci_high"])
    page = (sweep / "dashboard.html").read_text()
    assert "Configurations over seeds" in page and '"error_x"' in page and '"fill":"toself"' in page
    ARTIFACTS.mkdir(exist_ok=True)
    _, log = render(sweep / "dashboard.html", ARTIFACTS / "dashboard_seeds.png")
    assert not [line for line in log.splitlines() if ":CONSOLE" in line]
    # moe-lab dashboard prints the same groups for the sweep.
    again = run_cli(["dashboard", str(sweep), "-o", str(tmp_path / "again.html")], cwd=tmp_path)
    assert again.returncode == 0 and "2 configurations over seeds" in again.stdout


def test_resolvable_difference_and_seeds_to_resolve_by_hand():
    """Paired, spread 0.02 over 3 seeds: differences above t(2) * 0.02 / sqrt(3) are resolved. A difference of 0.01 at
    that spread needs the least n with (t_.975(n-1) + t_.8(n-1)) * 0.02 / sqrt(n) <= 0.01."""
    from scipy import stats

    from moe_lab.analysis.stats import resolvable_difference, seeds_to_resolve

    assert resolvable_difference(0.02, 3, paired=True) == pytest.approx(T_975[2] * 0.02 / math.sqrt(3))
    assert resolvable_difference(0.02, 3, paired=False) == pytest.approx(T_975[4] * 0.02 * math.sqrt(2 / 3))
    assert math.isnan(resolvable_difference(0.02, 1, paired=True))

    def enough(n: int) -> bool:
        return (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * 0.02 / math.sqrt(n) <= 0.01

    n = seeds_to_resolve(0.01, 0.02, paired=True)
    assert enough(int(n)) and not enough(int(n) - 1) and 30 < n < 40  # about (1.96 + 0.84)^2 * 4 = 31, plus t's tails
    assert seeds_to_resolve(-0.01, 0.02, paired=True) == n  # the sign does not matter
    assert seeds_to_resolve(0.01, 0.02, paired=False) > n  # unpaired needs more: the seed's own luck stays
    assert seeds_to_resolve(0.0, 0.02, paired=True) == math.inf and seeds_to_resolve(1e-6, 0.02, True) == math.inf


def test_an_unresolved_difference_says_how_many_seeds_it_needs(tmp_path):
    """e8 is 0.01 below e16 in two seeds of three and above in one: not separated; the table, the dashboard's text
    and sweep_groups.csv say what these seeds resolve and how many would separate the observed difference."""
    from moe_lab.analysis.seeds import differences, group_rows
    from moe_lab.analysis.stats import paired_difference_interval, resolvable_difference, seeds_to_resolve

    e8, e16 = [1.90, 1.95, 1.93], [1.91, 1.96, 1.92]
    runs = [
        fake_run(tmp_path, f"{c}-{s}", [f"experts={c}", f"seed={s}"], loss)
        for c, losses in (("e8", e8), ("e16", e16))
        for s, loss in enumerate(losses, 1)
    ]
    groups = seed_groups(runs)
    (d,) = differences(ranked_groups(groups))
    paired = paired_difference_interval(e8, e16)
    assert d["needs_from"] == "paired" and not d["paired_separated"]
    assert d["resolvable"] == pytest.approx(resolvable_difference(paired["std"], 3, paired=True))
    assert d["seeds_needed"] == seeds_to_resolve(paired["diff"], paired["std"], paired=True) > 3
    table = group_table(groups)
    assert f"these seeds resolve differences above {d['resolvable']:.4f} (paired)" in table
    assert f"about {int(d['seeds_needed'])} seeds per group (80% power)" in table
    first = group_rows(groups)[0]
    assert first["diff_from"] == "paired" and first["seeds_needed"] == int(d["seeds_needed"])
    assert first["diff_low"] < 0 < first["diff_high"] and group_rows(groups)[1].get("diff_to_next") in ("", None)


def test_a_separated_difference_needs_no_more_seeds(tmp_path):
    runs = [
        fake_run(tmp_path, f"{c}-{s}", [f"experts={c}", f"seed={s}"], loss)
        for c, losses in (("e8", [1.90, 1.91, 1.92]), ("e4", [2.00, 2.01, 2.03]))
        for s, loss in enumerate(losses, 1)
    ]
    from moe_lab.analysis.seeds import differences

    (d,) = differences(ranked_groups(seed_groups(runs)))
    assert d["paired_separated"] and math.isnan(d["seeds_needed"]) and d["resolvable"] < abs(d["diff"])
    assert "to separate" not in group_table(seed_groups(runs))


def test_the_paired_ratio_interval_is_the_t_interval_of_the_log_ratios_taken_back():
    from scipy import stats as scipy_stats

    from moe_lab.analysis.stats import paired_ratio_interval

    a, b = [60.0, 45.0, 120.0, 50.0, float("inf")], [70.0, 66.0, 65.0, 72.0, 68.0]  # the last pair is left out
    logs = np.log(np.array(a[:4]) / np.array(b[:4]))
    low, high = scipy_stats.t.interval(0.95, 3, loc=logs.mean(), scale=scipy_stats.sem(logs))
    got = paired_ratio_interval(a, b)
    assert got["n"] == 4
    assert got["mean"] == pytest.approx(np.exp(logs.mean()))
    assert (got["low"], got["high"]) == (pytest.approx(np.exp(low)), pytest.approx(np.exp(high)))
    assert paired_ratio_interval([2.0, 4.0], [1.0, 2.0])["mean"] == pytest.approx(2.0)  # a constant ratio


def test_runs_that_repeat_a_seed_give_no_interval(tmp_path):
    """Two runs of one seed (a date folder compared, a rerun) are one sample, not a 2-seed group with a zero-width
    interval."""
    runs = [fake_run(tmp_path, f"again-{i}", ["experts=e4"], 1.9) for i in range(2)]
    groups = seed_groups(runs)
    assert not has_seed_groups(groups)
    assert groups[0].values("val/loss") == [1.9] and groups[0].repeats == 1
    assert math.isnan(groups[0].interval("val/loss")["half"])
    runs.append(fake_run(tmp_path, "seed-2", ["experts=e4", "seed=2"], 2.1))
    groups = seed_groups(runs)
    assert has_seed_groups(groups) and sorted(groups[0].values("val/loss")) == [1.9, 2.1]
    assert "+1 rep." in group_table(groups)


def test_interval_bands_stop_at_what_a_metric_can_be(tmp_path):
    """Three seeds whose imbalance is 1.0, 1.0, 1.3 have a t interval reaching below 1; the bars and bands stop at 1."""
    from moe_lab.analysis.figures import group_bars, group_curves

    runs = []
    for seed, imbalance in enumerate((1.0, 1.0, 1.3), 1):
        run = fake_run(tmp_path, f"s{seed}", ["experts=e4", f"seed={seed}"], 2.0)
        run.summary["moe/mean_imbalance"] = imbalance
        run.metrics = [{"step": 10.0, "moe/max_imbalance": imbalance, "moe/dropped_frac": 0.01 * (seed == 3)}]
        runs.append(run)
    ranked = ranked_groups(seed_groups(runs))
    assert ranked[0].group.interval("moe/mean_imbalance")["low"] < 1
    bars = group_bars(ranked)
    balance = next(t for t in bars.data if t.type == "bar" and t.xaxis == "x2")
    assert balance.x[0] - balance.error_x.arrayminus[0] == pytest.approx(1.0)
    bands = [t for t in group_curves(ranked).data if t.fill == "toself"]
    assert bands and min(min(t.y) for t in bands if t.yaxis == "y3") >= 1.0
    assert min(min(t.y) for t in bands if t.yaxis == "y4") >= 0.0
