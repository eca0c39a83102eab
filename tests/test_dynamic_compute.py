"""Dynamic compute per token (router=top_p, router=dtop_p): the experts per token are seen wherever routing is shown:
the metrics (per layer, per domain, the distribution), the run's summary, its page, the sweep table and moe-lab eval."""

from __future__ import annotations

import csv
import json

import pytest

from moe_lab.analysis.runs import TABLE_COLUMNS
from moe_lab.cli.main import main
from moe_lab.training.train import train

from conftest import FAST

DATA = [o for o in FAST if o.startswith(("data.", "++data."))]


def test_a_top_p_run_shows_its_experts_per_token_everywhere(make_cfg, tmp_path, cache_dir, capsys):
    summary = train(make_cfg("router=dtop_p", "trainer.max_steps=6", name="dtop"))
    run = tmp_path / "dtop"
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("moe/experts_per_token")]
    assert rows
    for r in rows:
        k = float(r["moe/experts_per_token"])
        assert 1 <= k <= 4  # at least one expert, at most the cap
        per_layer = [float(r[f"moe/layer{layer}/experts_per_token"]) for layer in (0, 1)]
        assert abs(sum(per_layer) / 2 - k) < 1e-6
        domains = [float(r[f"moe/experts_per_token/{d}"]) for d in ("code", "docs", "math")]
        assert min(domains) <= k + 1e-6 and max(domains) >= k - 1e-6  # the overall mean lies among the domains'
    record = json.loads((run / "routing.jsonl").read_text().splitlines()[-1])
    hist = record["layers"][0]["experts_per_token_hist"]
    assert len(hist) == 9 and hist[0] == 0 and sum(hist[5:]) == 0  # 8 experts; never none, never past the cap
    assert summary["moe/experts_per_token"] == float(rows[-1]["moe/experts_per_token"])
    assert "Experts per token" in (run / "dashboard.html").read_text()
    assert "experts/token" in capsys.readouterr().out  # the end-of-run table
    assert ("moe/experts_per_token", "experts/tok", ".2f") in TABLE_COLUMNS
    out = tmp_path / "eval.json"
    assert main(["eval", summary["checkpoint"], *DATA, "--max-batches", "1", "--json", str(out)]) == 0
    assert all(1 <= e["experts_per_token"] <= 4 for e in json.loads(out.read_text())["layers"].values())


def test_a_fixed_top_k_run_logs_k_experts_per_token_and_no_distribution(make_cfg, tmp_path):
    train(make_cfg("trainer.max_steps=3", "metrics.dashboard=false", name="topk"))
    rows = [r for r in csv.DictReader(open(tmp_path / "topk" / "metrics.csv")) if r.get("moe/experts_per_token")]
    assert rows and all(float(r["moe/experts_per_token"]) == 2.0 for r in rows)
    assert len({r["moe/flops_per_token"] for r in rows}) == 1  # top-k's compute is a constant
    assert "moe/experts_per_token/code" not in rows[0] or not rows[0]["moe/experts_per_token/code"]
    record = json.loads((tmp_path / "topk" / "routing.jsonl").read_text().splitlines()[-1])
    assert "experts_per_token_hist" not in record["layers"][0]


def test_the_flops_per_token_price_the_experts_tokens_took(make_cfg, tmp_path):
    """moe/flops_per_token: top-2's constant, and for a router held at 2 experts per token (DTop-p) that constant
    plus one expert's FLOPs for every expert taken above 2 (below: minus), summed over the layers."""
    from moe_lab.training.checkpoint import load_model

    cfg = make_cfg("trainer.max_steps=6", "metrics.dashboard=false", name="topk")
    model = load_model(train(cfg)["checkpoint"]).model
    train(make_cfg("router=dtop_p", "trainer.max_steps=6", "metrics.dashboard=false", name="dtop"))

    def read(run: str) -> list[dict]:
        return [r for r in csv.DictReader(open(tmp_path / run / "metrics.csv")) if r.get("moe/flops_per_token")]

    top2 = float(read("topk")[0]["moe/flops_per_token"])
    assert top2 == model.flops_per_token(cfg.data.seq_len)
    per_expert = {layer: flops for layer, (flops, _) in model.routed_expert_flops().items()}
    for r in read("dtop"):
        taken = {layer: float(r[f"moe/layer{layer}/experts_per_token"]) for layer in per_expert}
        extra = sum(flops * (taken[layer] - 2) for layer, flops in per_expert.items())
        assert float(r["moe/flops_per_token"]) == pytest.approx(top2 + extra, rel=1e-9)
