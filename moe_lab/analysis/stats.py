"""Statistics of expert routing from counts, and of metrics over seeds (NumPy and SciPy; never torch).

load_statistics      balance of one layer's per-expert counts: max/mean (imbalance), MaxVio, CV, dead and
                     starved experts, the least loaded expert's share of its fair load
mutual_information   I(expert; domain) from an experts x domains table, and its share of H(domain)
mean_interval        mean, standard deviation and t interval of a metric over seeds; difference_interval:
                     two groups' difference with Welch's interval and p-value; paired_difference_interval: the
                     same over runs paired by seed (SciPy)
"""

from __future__ import annotations

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
        return {"n": n, "diff": diff, "low": float("nan"), "high": float("nan"), "p": float("nan")}
    d = pairs[:, 0] - pairs[:, 1]
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):  # the same difference in every pair (to rounding)
        return {"n": n, "diff": diff, "low": diff, "high": diff, "p": 0.0 if diff != 0 else 1.0}
    result = stats.ttest_rel(pairs[:, 0], pairs[:, 1])
    interval = result.confidence_interval(confidence)
    return {"n": n, "diff": diff, "low": float(interval.low), "high": float(interval.high), "p": float(result.pvalue)}


def intervals_overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two `mean_interval`s overlap (or either has no interval: then nothing separates them)."""
    if not (np.isfinite(a["half"]) and np.isfinite(b["half"])):
        return True
    return a["low"] <= b["high"] and b["low"] <= a["high"]
