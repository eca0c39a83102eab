"""The routing analyses on cases whose answers are known without running them."""

from __future__ import annotations

import numpy as np
import pytest

from moe_lab.analysis.routing import (
    RoutingCounts,
    coactivation,
    domain_shares,
    drops_by_position,
    experts_per_token,
    layer_transitions,
    random_share,
    repeat_rates,
    saturation,
    vocab_specialisation,
)
from moe_lab.analysis.stats import mutual_information
from moe_lab.tools.analyze import ANALYSIS_TABLES

rng = np.random.default_rng(0)
L, B, S, E, V, D = 2, 6, 16, 4, 32, 2


def counts_of(experts_LBSK, tokens_BS, domain_B, dropped=None, top_k=None) -> RoutingCounts:
    counts = RoutingCounts(L, E, top_k or experts_LBSK.shape[-1], V, D, S)
    next_BS = np.roll(tokens_BS, -1, axis=1)
    counts.add(experts_LBSK, tokens_BS, next_BS, domain_B, dropped)
    return counts


def test_a_router_that_hashes_token_ids_is_fully_vocabulary_specialised():
    tokens = rng.integers(0, V, (B, S))
    experts = np.broadcast_to((tokens * 7 % E)[None, :, :, None], (L, B, S, 1)).copy()  # expert = f(token id)
    counts = counts_of(experts, tokens, rng.integers(0, D, B))
    share, mean, favourite = vocab_specialisation(counts.input_LVE, counts.input_V)
    seen = ~np.isnan(share[0])
    assert np.all(share[:, seen] == 1.0) and np.all(mean == 1.0)
    assert np.array_equal(favourite[0][seen], (np.arange(V) * 7 % E)[seen])
    # Random routing of many occurrences: about k/E.
    many = rng.integers(0, V, (B * 50, S))
    random = rng.integers(0, E, (L, B * 50, S, 1))
    c = RoutingCounts(L, E, 1, V, D, S)
    c.add(random, many, many, rng.integers(0, D, B * 50))
    assert abs(vocab_specialisation(c.input_LVE, c.input_V)[1][0] - 1 / E) < 0.06


def test_a_router_that_follows_the_domain_is_fully_domain_specialised():
    domain = np.array([0, 1, 0, 1, 0, 1])
    experts = np.broadcast_to(np.where(domain == 0, 1, 3)[None, :, None, None], (L, B, S, 1)).copy()
    counts = counts_of(experts, rng.integers(0, V, (B, S)), domain)
    shares = domain_shares(counts)
    assert shares[0, 1, 0] == 1.0 and shares[0, 3, 1] == 1.0 and shares[0, 0].sum() == 0
    assert mutual_information(counts.domain_LED[0])[1] == pytest.approx(1.0)


def test_top1_routing_has_no_coactivation_off_the_diagonal_and_top2_pairs_are_counted_both_ways():
    experts = rng.integers(0, E, (L, B, S, 1))
    co = coactivation(counts_of(experts, rng.integers(0, V, (B, S)), rng.integers(0, D, B)))
    assert np.all(co[0] == np.diag(np.diag(co[0]))) and set(np.diag(co[0])) <= {0.0, 1.0}
    # Top-2, every token choosing (0, 1) or (2, 3) or (0, 2) in equal parts: P(1 | 0) = 1/2, P(0 | 1) = 1, ...
    choices = np.array([[0, 1], [2, 3], [0, 2]])
    experts = np.broadcast_to(choices[np.arange(B * S) % 3].reshape(1, B, S, 2), (L, B, S, 2)).copy()
    co = coactivation(counts_of(experts, rng.integers(0, V, (B, S)), rng.integers(0, D, B)))
    assert co[0, 0, 1] == pytest.approx(0.5) and co[0, 1, 0] == 1.0 and co[0, 0, 2] == pytest.approx(0.5)
    assert co[0, 2, 3] == pytest.approx(0.5) and co[0, 3, 2] == 1.0 and co[0, 1, 3] == 0.0


def test_layer_transitions_follow_a_fixed_mapping():
    first = rng.integers(0, E, (B, S))
    experts = np.stack([first, (first + 1) % E])[..., None]  # layer 1 = layer 0's expert + 1
    t = layer_transitions(counts_of(experts, rng.integers(0, V, (B, S)), rng.integers(0, D, B)))
    for i in range(E):
        if t[0, i].sum():
            assert t[0, i, (i + 1) % E] == 1.0


def test_repeat_rate_of_a_hand_made_routing():
    # Every sequence routes its tokens 0,0,1,1,2,2,...: 8 of the 15 consecutive pairs of 16 tokens repeat.
    pattern = (np.arange(S) // 2) % E
    experts = np.broadcast_to(pattern[None, None, :, None], (L, B, S, 1)).copy()
    rates = repeat_rates(counts_of(experts, rng.integers(0, V, (B, S)), rng.integers(0, D, B)))
    assert rates["top1"][0] == pytest.approx(8 / 15) and rates["topk"][0] == pytest.approx(8 / 15)
    assert 0.15 < rates["top1_chance"][0] < 0.4  # 4 experts used equally: chance about 1/4


def test_drops_by_position_of_a_hand_made_drop_pattern():
    experts = rng.integers(0, E, (L, B, S, 2))
    dropped = np.zeros((L, B, S, 2), dtype=bool)
    dropped[:, :, S // 2 :, 1] = True  # the second choice of every token in the second half
    dropped[1, :3, -1, 0] = True  # and, in layer 1, the first choice of the last token of half the sequences
    curve = drops_by_position(counts_of(experts, rng.integers(0, V, (B, S)), rng.integers(0, D, B), dropped))
    assert np.all(curve[:, : S // 2] == 0) and np.all(curve[0, S // 2 :] == 0.5)
    assert curve[1, -1] == pytest.approx((B + 3) / (2 * B))


def test_saturation_of_identical_and_of_unrelated_routers():
    chosen = np.stack([rng.permutation(8)[:2] for _ in range(2000)])
    assert saturation(chosen, chosen, 8) == (1.0, 1.0)
    other = np.stack([rng.permutation(8)[:2] for _ in range(2000)])
    top1, topk = saturation(chosen, other, 8)
    assert abs(top1 - 1 / 8) < 0.03 and abs(topk - 2 / 8) < 0.03  # chance: k/E


def test_analyze_command_on_a_hash_routed_checkpoint(make_cfg, tmp_path, cache_dir, capsys):
    """End to end, known answers: hash routing is a function of the token id (vocabulary specialisation 1 in every
    layer), and a checkpoint compared with itself is saturated (1)."""
    import json

    from moe_lab.cli.main import main
    from moe_lab.training.train import train

    from conftest import FAST

    ckpt = train(
        make_cfg("router=hash", "aux_loss=none", "trainer.max_steps=2", "metrics.dashboard=false", name="hash")
    )["checkpoint"]
    data = [o for o in FAST if o.startswith(("data.", "++data."))]
    page = tmp_path / "analysis.html"
    trace = tmp_path / "trace.parquet"
    assert (
        main(
            [
                "analyze",
                ckpt,
                ckpt,
                *data,
                f"paths.cache_dir={cache_dir}",
                "-o",
                str(page),
                "--trace",
                str(trace),
                "--capacity-factor",
                "0.5",
                "--capacity-factor",
                "100",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "analysis.json").read_text())
    html = page.read_text()
    assert "Domain specialisation" in html and "Expert co-activation" in html and html.count("Plotly.newPlot") >= 5
    assert set(report["layers"]) == {"0", "1"} and report["top_k"] == 1
    for layer in report["layers"].values():
        assert layer["vocab_specialisation_input"] == 1.0
        assert layer["saturation"] == [{"top1": 1.0, "topk": 1.0}]
        assert abs(sum(sum(col) for col in zip(*layer["domain_shares"])) - len(report["domains"])) < 1e-9
        assert len(layer["drops_by_position"]) == 64
    assert "vocab spec." in capsys.readouterr().out
    # The trace: one row per token; hash routing makes each token id's expert the same wherever it occurs.
    import pyarrow.parquet as pq

    table = pq.read_table(trace).to_pydict()
    assert len(table["token"]) == report["tokens"] and set(table["domain"]) <= set(report["domains"])
    by_token = {}
    for token, experts, weights in zip(table["token"], table["layer0_experts"], table["layer0_weights"]):
        by_token.setdefault(token, set()).add(experts[0])
        assert len(experts) == len(weights) == 1
    assert all(len(experts) == 1 for experts in by_token.values())
    # Drops under --capacity-factor 0.5, by hand from the trace: hash routing does not depend on what earlier layers
    # dropped, so each batch of 8 sequences (the last one shorter) keeps, per expert, its first ceil(0.5 * T / E)
    # tokens in batch order; 100 leaves room for every token.
    E, S = report["num_experts"], 64
    experts = np.array([e[0] for e in table["layer0_experts"]]).reshape(-1, S)
    dropped_S = np.zeros(S)
    for start in range(0, len(experts), 8):
        batch = experts[start : start + 8].reshape(-1)
        capacity = int(np.ceil(0.5 * batch.size / E))
        for expert in range(E):
            where = np.flatnonzero(batch == expert)
            np.add.at(dropped_S, where[capacity:] % S, 1)
    for layer in report["layers"].values():
        assert layer["drops_by_position_at"]["0.5"] == pytest.approx(dropped_S / len(experts))
        assert layer["drops_by_position_at"]["100.0"] == [0.0] * S
    # The tables beside the page: long format, one row per layer x domain x expert and so on.
    import csv

    rows = list(csv.DictReader(open(tmp_path / "analysis.layers.csv")))
    assert [r["layer"] for r in rows] == ["0", "1"] and float(rows[0]["vocab_specialisation_input"]) == 1.0
    shares = list(csv.DictReader(open(tmp_path / "analysis.domain_shares.csv")))
    assert len(shares) == 2 * len(report["domains"]) * E
    drops = list(csv.DictReader(open(tmp_path / "analysis.drops_by_position.csv")))
    assert {r["capacity_factor"] for r in drops} == {"checkpoint", "0.5", "100.0"} and len(drops) == 2 * 3 * S
    saturated = list(csv.DictReader(open(tmp_path / "analysis.saturation.csv")))
    assert [(r["step"], r["top1"]) for r in saturated] == [("2", "1.0")] * 2
    assert report["steps"] == [2, 2]
    # Refused before any work: another program's CSV at a table's name; an impossible capacity factor.
    other = tmp_path / "other.coactivation.csv"
    other.write_text("mine\n")
    assert main(["analyze", ckpt, *data, f"paths.cache_dir={cache_dir}", "-o", str(tmp_path / "other.html")]) == 2
    assert other.read_text() == "mine\n" and not (tmp_path / "other.json").exists()
    assert main(["analyze", ckpt, *data, "-o", str(tmp_path / "x.html"), "--capacity-factor", "0"]) == 2
    assert "positive number" in capsys.readouterr().err
    assert (
        main(["analyze", ckpt, *data, f"paths.cache_dir={cache_dir}", "-o", str(page), "--trace", str(trace)]) == 2
    )  # never written over
    assert main(["analyze", *data]) == 2
    assert main(["analyze", ckpt, "model.d_model=8"]) == 2


@pytest.mark.slow
def test_the_analysis_page_renders_in_headless_chromium(make_cfg, tmp_path, cache_dir):
    from test_dashboard import ARTIFACTS, render

    from moe_lab.cli.main import main
    from moe_lab.training.train import train

    from conftest import FAST

    ckpt = train(make_cfg("trainer.max_steps=4", "metrics.dashboard=false", name="run"))["checkpoint"]
    data = [o for o in FAST if o.startswith(("data.", "++data."))]
    page = tmp_path / "analysis.html"
    assert main(["analyze", ckpt, *data, f"paths.cache_dir={cache_dir}", "-o", str(page)]) == 0
    ARTIFACTS.mkdir(exist_ok=True)
    dom, log = render(page, ARTIFACTS / "analysis.png")
    assert not [line for line in log.splitlines() if ":CONSOLE" in line]
    figures = page.read_text().count('class="plotly-graph-div"')
    assert figures >= 5 and dom.count("js-plotly-plot") >= figures


def test_the_domain_oracle_is_fully_domain_specialised(make_cfg, tmp_path, cache_dir):
    import json

    from moe_lab.cli.main import main
    from moe_lab.training.train import train

    from conftest import FAST

    ckpt = train(
        make_cfg(
            "router=domain_oracle", "aux_loss=none", "trainer.max_steps=2", "metrics.dashboard=false", name="oracle"
        )
    )["checkpoint"]
    data = [o for o in FAST if o.startswith(("data.", "++data."))]
    assert main(["analyze", ckpt, *data, f"paths.cache_dir={cache_dir}", "-o", str(tmp_path / "a.html")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    for layer in report["layers"].values():
        assert layer["domain_specialisation"] == pytest.approx(1.0)
        shares = np.asarray(layer["domain_shares"])  # (E, D): domain d's tokens all at expert d
        assert np.array_equal(shares[:3], np.eye(3)) and shares[3:].sum() == 0


def test_analyses_during_training_are_logged_and_agree_with_the_command(make_cfg, tmp_path, cache_dir):
    """metrics.analysis_every_n_steps: hash routing logs vocabulary specialisation 1 and (top-1) no co-activation at
    every analysed validation (steps 0, 6, 12), the run dashboard draws them, and the last ones equal what `moe-lab
    analyze` computes on the final checkpoint with the run's capacity (the same validation blocks and batches)."""
    import json

    from moe_lab.analysis.runs import read_run
    from moe_lab.cli.main import main
    from moe_lab.training.train import train

    from conftest import FAST

    summary = train(make_cfg("router=hash", "aux_loss=none", "metrics.analysis_every_n_steps=5", name="hash"))
    run = read_run(tmp_path / "hash")
    steps, values = run.series("analysis/layer0/vocab_specialisation")
    assert steps == [0, 6, 12] and values == [1.0, 1.0, 1.0]  # due at the first validation after steps 5 and 10
    assert run.series("analysis/layer1/max_coactivation")[1] == [0.0, 0.0, 0.0]
    assert run.series("analysis/random_baseline")[1] == [1 / 8] * 3  # top-1 of 8 experts
    assert "Routing analyses over training" in (tmp_path / "hash" / "dashboard.html").read_text()
    data = [o for o in FAST if o.startswith(("data.", "++data."))]
    assert (
        main(["analyze", summary["checkpoint"], *data, f"paths.cache_dir={cache_dir}", "-o", str(tmp_path / "a.html")])
        == 0
    )
    report = json.loads((tmp_path / "a.json").read_text())
    for layer, e in report["layers"].items():
        assert run.final(f"analysis/layer{layer}/repeat_top1") == pytest.approx(e["repeat_top1"], abs=1e-12)
        assert run.final(f"analysis/layer{layer}/repeat_top1_chance") == pytest.approx(
            e["repeat_top1_chance"], abs=1e-12
        )


def test_analyses_during_training_refuse_a_dense_model(make_cfg):
    from moe_lab.errors import UserError
    from moe_lab.training.train import train

    with pytest.raises(UserError, match="analysis_every_n_steps"):
        train(make_cfg("model=dense_tiny", "metrics.analysis_every_n_steps=5"))


def test_expert_sets_of_any_size_are_counted_as_they_are():
    """Tokens with no expert, one, or three (padded with E), by hand: the experts per token, the domain shares (a
    domain's column sums to its experts per token), the vocabulary specialisation per occurrence, the slots, and
    first choices (a token with none has no first choice to repeat or follow)."""
    sets = [[E, E, E], [2, E, E], [0, 1, 3]]  # token t of every sequence takes sets[t % 3]
    experts = np.array([sets[t % 3] for t in range(S)])
    experts_LBSK = np.broadcast_to(experts[None, None], (L, B, S, 3)).copy()
    tokens = np.broadcast_to(np.arange(S) % 3, (B, S)).copy()  # token id t % 3: the id decides the set
    domain = np.array([0, 0, 0, 1, 1, 1])
    counts = counts_of(experts_LBSK, tokens, domain)
    n = np.bincount([len([e for e in x if e < E]) for x in experts], minlength=E + 1) * B
    assert np.array_equal(counts.size_LN[0], n) and np.array_equal(counts.size_LN[1], n)
    assert experts_per_token(counts)[0] == pytest.approx(n @ np.arange(E + 1) / (B * S))
    assert random_share(counts)[0] == pytest.approx(experts_per_token(counts)[0] / E)
    shares = domain_shares(counts)
    assert shares[0].sum(0) == pytest.approx([experts_per_token(counts)[0]] * 2)
    share, _, favourite = vocab_specialisation(counts.input_LVE, counts.input_V)
    assert share[0, 1] == 1.0 and favourite[0, 1] == 2  # id 1 always at expert 2
    assert share[0, 2] == 1.0 and share[0, 0] == 0.0  # id 2 always at 0, 1 and 3; id 0 never at an expert
    assert counts.slots_LS[0, :3].tolist() == [0, B, 3 * B]
    assert np.array_equal(counts.size_LV[0, :3], np.array([0, 1, 3]) * counts.input_V[:3])
    assert counts.follow_LEE[0].sum() == B * ((S + 1) // 3 + S // 3)  # every token with a first choice, no other
    assert counts.repeat_L[0, 0] == 0  # no two consecutive tokens share a first choice; two "none"s do not count


def test_token_sets_of_expert_choice_list_each_tokens_experts_by_weight():
    import torch

    from moe_lab.model import MoEConfig, MoELayer
    from moe_lab.training.routing_replay import token_sets

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, expert_hidden=16, eval_capacity_factor=1.0, router={"name": "expert_choice"})
    _, stats = MoELayer(16, cfg).eval()(torch.randn(2, 12, 16) * 10)
    experts, dropped, weights, slots = token_sets(stats, 24, 4, None)
    for t in range(24):  # by hand from the slots
        mine = [(float(w), int(e)) for e, tok, w in zip(stats.expert_N, stats.token_N, stats.weight_N) if tok == t]
        want = [e for _, e in sorted(mine, key=lambda x: -x[0])]
        assert experts[t].tolist() == want + [4] * (experts.shape[1] - len(want))
        assert weights[t, : len(want)].tolist() == pytest.approx(sorted(w for w, _ in mine)[::-1])
    assert not dropped.any() and experts.shape[1] == int(stats.experts_per_token_T.max())
    assert np.array_equal(slots[experts < 4], np.nonzero(experts < 4)[1])  # expert choice: a token's k-th expert
    assert len(set((experts < 4).sum(1).tolist())) > 1  # the sets' sizes vary


@pytest.mark.parametrize("router", ["relu", "expert_choice"])
def test_analyze_reads_routers_whose_tokens_take_any_number_of_experts(router, make_cfg, tmp_path, cache_dir, capsys):
    """`moe-lab analyze` on ReLU routing and expert choice: the distribution of experts per token covers every token
    and agrees with the run's own count (`moe-lab eval`), the tokens that take the most experts are listed, a
    checkpoint is saturated against itself, and --trace lists each token's experts, as many as it took, in a trace
    that `moe-lab eval --replay` replays to the run's own numbers."""
    import csv
    import json

    from moe_lab.cli.main import main
    from moe_lab.training.train import train

    from conftest import FAST

    ckpt = train(make_cfg(f"router={router}", "trainer.max_steps=3", "metrics.dashboard=false", name=router))[
        "checkpoint"
    ]
    data = [o for o in FAST if o.startswith(("data.", "++data."))]
    page = tmp_path / "a.html"
    assert main(["analyze", ckpt, ckpt, *data, f"paths.cache_dir={cache_dir}", "-o", str(page)]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["experts_vary"]
    assert main(["eval", ckpt, *data, f"paths.cache_dir={cache_dir}", "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())["layers"]
    for layer, e in report["layers"].items():
        hist = e["experts_per_token_hist"]
        assert sum(hist) == report["tokens"] and len(hist) == report["num_experts"] + 1
        assert e["experts_per_token"] == pytest.approx(np.arange(len(hist)) @ hist / sum(hist))
        assert e["experts_per_token"] == pytest.approx(evaluated[layer]["experts_per_token"], abs=1e-6)
        most, fewest = e["most_experts_tokens"], e["fewest_experts_tokens"]
        assert most and most[0]["experts"] >= most[-1]["experts"] >= fewest[0]["experts"]
        assert e["saturation"] == [{"top1": 1.0, "topk": 1.0}]
        shares = np.asarray(e["domain_shares"])
        by_domain = e["experts_per_token_by_domain"]
        assert shares.sum(0) == pytest.approx([by_domain[d] for d in report["domains"]])
    out = capsys.readouterr().out
    assert "experts/token" in out and "most experts" in out
    rows = list(csv.DictReader(open(tmp_path / "a.token_experts.csv")))
    assert {r["list"] for r in rows} == {"most", "fewest"}
    hist_rows = list(csv.DictReader(open(tmp_path / "a.experts_per_token.csv")))
    assert sum(int(r["tokens"]) for r in hist_rows) == report["tokens"] * len(report["layers"])
    import pyarrow.parquet as pq

    trace = tmp_path / "t.parquet"
    data.append(f"paths.cache_dir={cache_dir}")
    assert main(["analyze", ckpt, *data, "-o", str(tmp_path / "b.html"), "--trace", str(trace)]) == 0
    table = pq.read_table(trace)
    for layer, e in report["layers"].items():
        sizes = np.bincount([len(x) for x in table[f"layer{layer}_experts"].to_pylist()], minlength=len(hist))
        assert sizes.tolist() == e["experts_per_token_hist"]
    assert (f"layer{layer}_slots" in table.column_names) == (router == "relu")
    assert main(["eval", ckpt, *data, "--replay", str(trace), "--json", str(tmp_path / "r.json")]) == 0
    replayed = json.loads((tmp_path / "r.json").read_text())
    assert replayed["overall"] == json.loads((tmp_path / "e.json").read_text())["overall"]
    assert replayed["replay"]["overridden_slots"] == 0


def test_analyses_during_training_read_expert_choice(make_cfg, tmp_path):
    from moe_lab.analysis.runs import read_run
    from moe_lab.training.train import train

    train(make_cfg("router=expert_choice", "metrics.analysis_every_n_steps=5", "metrics.dashboard=false", name="ec"))
    run = read_run(tmp_path / "ec")
    steps, values = run.series("analysis/layer0/vocab_specialisation")
    assert steps == [0, 6, 12] and all(0 < v <= 1 for v in values)
    baseline = run.series("analysis/random_baseline")[1]
    assert all(0 < b <= 1 for b in baseline)  # the mean experts per token / E, which expert choice varies


def test_analyze_a_hugging_face_model_directory(tmp_path, cache_dir):
    """An imported architecture's routing, straight from its Hugging Face directory (here a tiny random OLMoE, top-2
    of its experts in every layer): the analyses' invariants hold (domain shares sum to k per domain, co-activation's
    diagonal is 1 for used experts)."""
    import json

    from test_import import save_hf_model

    from moe_lab.cli.main import main

    from conftest import FAST

    save_hf_model("olmoe", tmp_path / "hf")
    data = [o for o in FAST if o.startswith(("data.", "++data."))]
    assert (
        main(
            [
                "analyze",
                str(tmp_path / "hf"),
                *data,
                f"paths.cache_dir={cache_dir}",
                "--max-batches",
                "2",
                "-o",
                str(tmp_path / "a.html"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["steps"] == [None] and report["tokens"] > 0 and report["tokens"] % 64 == 0
    for layer in report["layers"].values():
        shares = np.asarray(layer["domain_shares"])
        assert np.allclose(shares.sum(0)[shares.sum(0) > 0], report["top_k"])
        co = np.asarray(layer["coactivation"])
        used = co.diagonal() > 0
        assert np.allclose(co.diagonal()[used], 1.0) and report["top_k"] == 2


def test_reports_go_into_the_checkpoints_run_not_the_current_folder(real_checkpoint, cache_dir, tmp_path, monkeypatch):
    """`moe-lab analyze RUN/checkpoints/last.ckpt` and `generate --show-experts` without -o/--html write into
    RUN/analysis/ (named by the checkpoint), and say where; the current folder is left as it was."""
    import shutil

    from moe_lab.cli.main import main

    from conftest import FAST

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(real_checkpoint, run / "checkpoints" / "last.ckpt")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    data = [o for o in FAST if o.startswith(("data.", "++data."))] + [f"paths.cache_dir={cache_dir}"]
    assert main(["analyze", str(run / "checkpoints" / "last.ckpt"), *data, "--max-batches", "1"]) == 0
    assert main(["generate", str(run / "checkpoints" / "last.ckpt"), "--prompt", "x", "--show-experts", "0"]) == 0
    assert list(here.iterdir()) == []
    written = sorted(p.name for p in (run / "analysis").iterdir())
    assert "last.analysis.html" in written and "last.analysis.json" in written and "last.experts-layer0.html" in written
    assert len([n for n in written if n.endswith(".csv")]) == len(ANALYSIS_TABLES)
