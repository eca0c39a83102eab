"""Routing statistics: the formulas on hand-made examples, and what a run logs and writes."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from moe_lab.analysis.figures import load_ratio_heatmap
from moe_lab.analysis.stats import load_statistics, mutual_information
from moe_lab.training.metrics import peak_flops
from moe_lab.training.train import train


def test_load_statistics():
    stats = load_statistics(np.array([30.0, 10.0, 0.0, 40.0]))
    assert stats["imbalance"] == pytest.approx(0.5 / 0.25)
    assert stats["maxvio"] == pytest.approx(1.0)
    assert stats["cv"] == pytest.approx(np.std([0.375, 0.125, 0, 0.5]) / 0.25)
    assert stats["dead_experts"] == 1
    assert stats["min_load"] == 0.0 and stats["starved_experts"] == 1
    assert load_statistics(np.full(8, 5.0))["imbalance"] == 1.0
    # Three experts with 1% of the slots each are alive (no dead expert) but starved: max/mean cannot tell.
    starving = load_statistics(np.array([97.0, 1.0, 1.0, 1.0]))
    assert starving["dead_experts"] == 0 and starving["starved_experts"] == 3
    assert starving["min_load"] == pytest.approx(0.01 / 0.25)
    balanced = load_statistics(np.array([24.0, 26.0, 25.0, 25.0]))
    assert balanced["starved_experts"] == 0 and balanced["min_load"] == pytest.approx(0.96)


def test_mutual_information():
    # Each expert takes exactly one domain: I = H(domain) = log 2, normalised 1.
    mi, norm = mutual_information(np.array([[50.0, 0.0], [0.0, 50.0]]))
    assert mi == pytest.approx(math.log(2)) and norm == pytest.approx(1.0)
    # Experts ignore the domain: I = 0.
    assert mutual_information(np.array([[20.0, 10.0], [40.0, 20.0]]))[0] == pytest.approx(0.0, abs=1e-12)
    # Hand-computed: p = [[.4, .1], [.1, .4]].
    p = np.array([[0.4, 0.1], [0.1, 0.4]])
    expected = sum(p[i, j] * math.log(p[i, j] / 0.25) for i in range(2) for j in range(2))
    assert mutual_information(p * 100)[0] == pytest.approx(expected)


def test_heatmap_and_peak_flops():
    # Load over time on a log scale around the fair share: 94% and 26% of 8 experts' slots look different (a
    # linear scale capped at 2/E = 25% drew both at its top), a dead expert sits at the bottom, 1/E in the middle.
    trace = load_ratio_heatmap([10, 20], np.array([[0.94, 0.26], [0.125, 0.0]] + [[0.0, 0.1]] * 6))
    z = np.asarray(trace.z)
    assert (trace.zmin, trace.zmid, trace.zmax) == (-3, 0, 3)
    assert z[0, 0] == pytest.approx(np.log2(0.94 * 8)) and z[0, 1] == pytest.approx(np.log2(0.26 * 8))
    assert z[0, 0] - z[0, 1] > 1.5 and z[1, 0] == 0 and z[1, 1] == -3
    assert list(trace.colorbar.ticktext) == ["1/8x", "1/4x", "1/2x", "1x", "2x", "4x", "8x"]
    assert peak_flops(torch.device("cpu"), "32-true") is None  # never a guess


def test_a_run_logs_and_writes_routing_statistics(make_cfg, tmp_path):
    train(make_cfg(name="run"))
    run_dir = tmp_path / "run"
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("train/loss")]
    last = {k: float(v) for k, v in rows[-1].items() if v}
    for layer in (0, 1):
        p = f"moe/layer{layer}/"
        for key in (
            "imbalance",
            "maxvio",
            "cv",
            "dropped_frac",
            "dead_experts",
            "min_load",
            "starved_experts",
            "entropy",
            "entropy_norm",
            "topk_mass",
            "domain_mi",
            "specialization",
            "aux/load_balance",
            "aux/z_loss",
        ):
            assert p + key in last, p + key
        assert last[p + "maxvio"] == pytest.approx(last[p + "imbalance"] - 1)
        assert last[p + "entropy_norm"] == pytest.approx(last[p + "entropy"] / math.log(8))
        assert 0 < last[p + "topk_mass"] <= 1 and 0 <= last[p + "specialization"] <= 1
    assert last["moe/max_imbalance"] == max(last["moe/layer0/imbalance"], last["moe/layer1/imbalance"])
    assert last["moe/min_load"] == min(last["moe/layer0/min_load"], last["moe/layer1/min_load"])
    assert last["moe/starved_experts"] == last["moe/layer0/starved_experts"] + last["moe/layer1/starved_experts"]
    records = [json.loads(line) for line in (run_dir / "routing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9, 12] and records[0]["domains"] == ["code", "docs", "math"]
    final = records[-1]["layers"][0]
    assert sum(final["load"]) == pytest.approx(1.0, abs=1e-4)
    for e in range(8):
        assert final["load"][e] == pytest.approx(last[f"moe/layer0/expert{e}/load"], abs=1e-5)
    # The expert x domain table counts every routing decision of the logging step (the routing statistics are
    # computed at logging steps only): 8 sequences x 64 tokens x top-2.
    assert np.asarray(final["domain_counts"]).sum() == 8 * 64 * 2
    mi, norm = mutual_information(np.asarray(final["domain_counts"], dtype=float))
    assert norm == pytest.approx(last["moe/layer0/specialization"], abs=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "moe/max_imbalance" in summary and "moe/starved_experts" in summary and "moe/min_load" in summary
    assert not any(k.startswith("moe/layer") for k in summary)


def test_held_out_standard_error_by_hand():
    """Blocks of mean loss 1, 2 and 3: standard deviation 1, so the standard error of their mean is 1 / sqrt(3)."""
    from moe_lab.training.module import held_out_se

    values = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    blocks = torch.stack([torch.tensor(3.0, dtype=torch.float64), values.sum(), values.square().sum()])
    assert held_out_se(blocks) == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(held_out_se(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)))


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("NVIDIA H200", "bf16-mixed", 989e12),  # Lightning's table has no plain "H200"
        ("NVIDIA H200 NVL", "bf16-mixed", 835e12),
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989e12),
        ("NVIDIA H100 NVL", "16-mixed", 835e12),  # Lightning's is the 2:4 sparsity figure, 1979e12
        ("NVIDIA H100 PCIe", "bf16-mixed", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),  # Lightning's table
    ],
)
def test_mfu_is_against_the_dense_16_bit_peak_of_hoppers(monkeypatch, name, precision, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), precision) == pytest.approx(expected)
