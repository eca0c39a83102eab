"""Statistics of expert routing from counts, and of metrics over seeds (NumPy and SciPy; never torch).

load_statistics      balance of one layer's per-expert counts: max/mean (imbalance), MaxVio, CV, dead and
                     starved experts, the least loaded expert's share of its fair load
mutual_information   I(expert; domain) from an experts x domains table, and its share of H(domain)
mean_interval        mean, standard deviation and t interval of a metric over seeds; difference_interval:
                     two groups' difference with Welch's interval and p-value; paired_difference_interval: the
                     same over runs paired by seed (SciPy)
resolvable_difference, seeds_to_resolve
                     the smallest difference n seeds resolve, and the seeds a difference needs (80% power)
"""

from __future__ import annotations

import math

import numpy as np

# An expert with less than this share of its fair load 1/E counts as starved (it may still get a few tokens).
STARVED_SHARE = 0.1


def load_statistics(counts_E: np.ndarray) -> dict[str, float]:
    """Balance of one layer's expert counts: imbalance = max load / mean load (1 = balanced), maxvio = imbalance - 1
    (DeepSeek's MaxVio), cv = std / mean of the loads, dead_experts = experts with no token, min_load = the least
    loaded expert's share over the fair share 1/E (0 = one starves, 1 = balanced), starved_experts = experts under
    STARVED_SHARE of the fair share: what max/mean cannot show."""
    counts_E = np.asarray(counts_E, dtype=np.float64)
    total = counts_E.sum()
    load = counts_E / max(total, 1)
    mean = load.mean()
    return {
        "imbalance": float(load.max() / mean) if mean > 0 else 0.0,
        "maxvio": float(load.max() / mean - 1) if mean > 0 else 0.0,
        "cv": float(load.std() / mean) if mean > 0 else 0.0,
        "dead_experts": float((counts_E == 0).sum()),
        "min_load": float(load.min() / mean) if mean > 0 else 0.0,
        "starved_experts": float((load < STARVED_SHARE * mean).sum()) if mean > 0 else float(len(counts_E)),
    }


def mutual_information(counts_ED: np.ndarray) -> tuple[float, float]:
    """(I(expert; domain) in nats, I / H(domain)) from a table of routing decisions per expert and domain:
    0 = experts ignore the domain, 1 = each domain has experts of its own."""
    counts_ED = np.asarray(counts_ED, dtype=np.float64)
    total = counts_ED.sum()
    if total == 0 or counts_ED.shape[1] < 2:
        return 0.0, 0.0
    p = counts_ED / total
    p_e, p_d = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (p_e @ p_d)[nz])).sum())
    h_d = float(-(p_d[p_d > 0] * np.log(p_d[p_d > 0])).sum())
    return mi, (mi / h_d if h_d > 0 else 0.0)


# ------------------------------------------------------------------------------------------------------------
# Seeds: is a difference real? (t intervals over runs that differ only in their seed)

CONFIDENCE = 0.95


def mean_interval(values, confidence: float = CONFIDENCE) -> dict[str, float]:
    """n, mean, sample standard deviation and the t interval of the mean (Student's t with n - 1 degrees of freedom;
    `half` is its half-width). One value has no spread: std and the interval are NaN."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return {
            "n": n,
            "mean": mean,
            "std": float("nan"),
            "low": float("nan"),
            "high": float("nan"),
            "half": float("nan"),
        }
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / np.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half, "half": half}


def difference_interval(a, b, confidence: float = CONFIDENCE) -> dict[str, float]:
    """mean(a) - mean(b) with Welch's t interval (unequal variances) and the two-sided p-value of Welch's t-test
    (scipy.stats.ttest_ind, equal_var=False). NaN where a group has fewer than two values."""
    from scipy import stats

    a = np.asarray([v for v in a if v is not None and np.isfinite(v)], dtype=np.float64)
    b = np.asarray([v for v in b if v is not None and np.isfinite(v)], dtype=np.float64)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "low": float("nan"), "high": float("nan"), "p": float("nan")}
    if a.std() == 0 and b.std() == 0:  # no spread at all (identical runs): the difference is exact
        return {"diff": diff, "low": diff, "high": diff, "p": 0.0 if diff != 0 else 1.0}
    result = stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(confidence)
    return {"diff": diff, "low": float(interval.low), "high": float(interval.high), "p": float(result.pvalue)}


def paired_difference_interval(a, b, confidence: float = CONFIDENCE) -> dict[str, float]:
    """mean(a - b) over pairs (the same seed: the same initial weights and data order in both configurations) with
    the paired t interval and p-value (scipy.stats.ttest_rel): the seed's own luck cancels, so a consistent
    difference shows with fewer seeds than Welch's test needs. NaN with fewer than two pairs."""
    from scipy import stats

    pairs = np.asarray(
        [(x, y) for x, y in zip(a, b) if x is not None and y is not None and np.isfinite(x) and np.isfinite(y)],
        dtype=np.float64,
    ).reshape(-1, 2)
    n = len(pairs)
    diff = float((pairs[:, 0] - pairs[:, 1]).mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "diff": diff, "low": float("nan"), "high": float("nan"), "p": float("nan"), "std": float("nan")}
    d = pairs[:, 0] - pairs[:, 1]
    std = float(d.std(ddof=1))
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):  # the same difference in every pair (to rounding)
        return {"n": n, "diff": diff, "low": diff, "high": diff, "p": 0.0 if diff != 0 else 1.0, "std": 0.0}
    result = stats.ttest_rel(pairs[:, 0], pairs[:, 1])
    interval = result.confidence_interval(confidence)
    return {
        "n": n,
        "diff": diff,
        "low": float(interval.low),
        "high": float(interval.high),
        "p": float(result.pvalue),
        "std": std,
    }


def paired_ratio_interval(a, b, confidence: float = CONFIDENCE) -> dict[str, float]:
    """The geometric mean of a / b over pairs, with the t interval of the mean log ratio taken back through exp:
    for quantities that spread multiplicatively (epochs or steps to a criterion, times), where a claim is a ratio
    ("half the epochs"). Pairs with a value that is not finite and positive are left out; NaN below two pairs."""
    logs = [math.log(x / y) for x, y in zip(a, b) if _positive(x) and _positive(y)]
    interval = mean_interval(logs, confidence)
    return {"n": interval["n"], **{k: math.exp(interval[k]) for k in ("mean", "low", "high")}}


def _positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def intervals_overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two `mean_interval`s overlap (or either has no interval: then nothing separates them)."""
    if not (np.isfinite(a["half"]) and np.isfinite(b["half"])):
        return True
    return a["low"] <= b["high"] and b["low"] <= a["high"]


# The power asked of a follow-up: with the seeds `seeds_to_resolve` names, a true difference of the size observed
# comes out separated (its interval excluding 0) in 80% of repeats, the usual bar of a planned experiment.
PLANNED_POWER = 0.8
MAX_SEEDS = 1000


def resolvable_difference(spread: float, n: int, paired: bool, confidence: float = CONFIDENCE) -> float:
    """The smallest difference of means that n seeds per group resolve: the half-width of the interval (paired over
    n pairs with `spread` the standard deviation of the per-seed differences; unpaired with `spread` the root mean
    of the two groups' variances, Welch's interval at equal n). A difference larger than this excludes 0. NaN when
    n < 2 or the spread is unknown."""
    from scipy import stats

    if n < 2 or not np.isfinite(spread):
        return float("nan")
    dof, scale = _dof_and_standard_error(spread, n, paired)
    return float(stats.t.ppf(0.5 + confidence / 2, dof) * scale)


def _dof_and_standard_error(spread: float, n: int, paired: bool) -> tuple[int, float]:
    """Degrees of freedom and standard error of a difference of means over n seeds per group: n - 1 and
    spread / sqrt(n) over n pairs; 2(n - 1) and spread * sqrt(2 / n) for two groups of n (Welch at equal n)."""
    if paired:
        return n - 1, spread / np.sqrt(n)
    return 2 * (n - 1), spread * np.sqrt(2 / n)


def seeds_to_resolve(
    diff: float, spread: float, paired: bool, power: float = PLANNED_POWER, confidence: float = CONFIDENCE
) -> float:
    """Seeds per group with which a true difference `diff` is resolved (its interval excludes 0) with probability
    `power`: the least n with (t_(1 - alpha/2) + t_power) * SE(n) <= |diff| (Student's t on n - 1 degrees of freedom
    paired, 2(n - 1) unpaired; SE as in `resolvable_difference`). The spread is the one observed, so this is a plan,
    not a promise. inf past MAX_SEEDS (or for no difference), NaN when the spread is unknown."""
    from scipy import stats

    if not (np.isfinite(diff) and np.isfinite(spread)):
        return float("nan")
    if spread == 0:
        return 2.0 if diff != 0 else float("inf")
    if diff == 0:
        return float("inf")
    for n in range(2, MAX_SEEDS + 1):
        dof, scale = _dof_and_standard_error(spread, n, paired)
        if (stats.t.ppf(0.5 + confidence / 2, dof) + stats.t.ppf(power, dof)) * scale <= abs(diff):
            return float(n)
    return float("inf")
