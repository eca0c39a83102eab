"""Statistics of expert routing, computed from counts (NumPy only: reading results never needs torch).

    load_statistics      balance of one layer's per-expert counts: max/mean (imbalance), MaxVio, CV, dead and
                         starved experts, the least loaded expert's share of its fair load
    mutual_information   I(expert; domain) from an experts x domains table, and its share of H(domain)
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
    return {"imbalance": float(load.max() / mean) if mean > 0 else 0.0,
            "maxvio": float(load.max() / mean - 1) if mean > 0 else 0.0,
            "cv": float(load.std() / mean) if mean > 0 else 0.0,
            "dead_experts": float((counts_E == 0).sum()),
            "min_load": float(load.min() / mean) if mean > 0 else 0.0,
            "starved_experts": float((load < STARVED_SHARE * mean).sum()) if mean > 0 else float(len(counts_E))}


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
