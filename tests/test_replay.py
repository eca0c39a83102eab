"""Routing replay (moe_lab/model/replay.py): a recording replays exactly, and each clause of the RL trainers'
contract holds for every router."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_lab.model import MoETransformer, ReplayMismatch, RoutingTape, Selection
from moe_lab.model.losses import load_balance_loss
from moe_lab.model.routers import ROUTERS

from conftest import tiny_moe_model

ALL = sorted(ROUTERS)
B, S, V = 3, 10, 64


def model_with(router: dict, seed: int = 0, num_experts: int = 4, capacity_factor=None, **moe) -> MoETransformer:
    return tiny_moe_model(
        router, num_experts, seed, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor, **moe
    )


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S + 1), generator=g)
    return ids[:, :-1], ids[:, 1:], torch.tensor([0, 1, 0])


def router_node(name: str) -> dict:
    return {"name": name, "causal": True} if name == "expert_choice" else {"name": name}


@pytest.mark.parametrize("name", ALL)
def test_replaying_a_models_own_recording_gives_exactly_its_logits_and_loss(name):
    model = model_with(router_node(name), capacity_factor=1.0 if ROUTERS[name].Config.uses_capacity else None)
    inputs, targets, domain_B = batch()
    with torch.no_grad(), model.record_routing() as tape:
        live = model(inputs, targets, domain_B=domain_B)
    assert sorted(l for _, l in tape.selections) == model.moe_layers
    with torch.no_grad(), model.replay_routing(tape):
        replayed = model(inputs, targets, domain_B=domain_B)
    assert torch.equal(replayed.logits, live.logits)
    assert torch.equal(replayed.loss, live.loss)
    for layer in model.moe_layers:
        assert float(replayed.moe[layer].overridden_slots) == 0
        assert live.moe[layer].overridden_slots is None
        assert torch.equal(replayed.moe[layer].tokens_per_expert_E, live.moe[layer].tokens_per_expert_E)


def test_replaying_model_a_in_model_b_routes_b_as_a_and_counts_what_it_overrode():
    a, b = model_with({"name": "topk", "top_k": 2}, seed=0), model_with({"name": "topk", "top_k": 2}, seed=7)
    inputs, targets, _ = batch()
    with torch.no_grad(), a.record_routing() as tape:
        a(inputs)
    with torch.no_grad(), b.record_routing() as own:
        b_live = b(inputs, targets)
    with torch.no_grad(), b.replay_routing(tape):
        b_as_a = b(inputs, targets)
    for layer in b.moe_layers:
        assert torch.equal(b_as_a.moe[layer].expert_N, tape.selections[(0, layer)].expert_N)
        # The overridden count is the number of A's (token, expert) pairs that B's own top-k lacks.
        mine = own.selections[(0, layer)].expert_ids_TK
        theirs = tape.selections[(0, layer)].expert_ids_TK
        expected = sum(len(set(t.tolist()) - set(m.tolist())) for t, m in zip(theirs, mine))
        assert float(b_as_a.moe[layer].overridden_slots) == expected > 0
    assert not torch.equal(b_as_a.logits, b_live.logits)


@pytest.mark.parametrize("name", ["topk", "aux_free", "switch", "noisy_topk", "hierarchical"])
def test_replayed_weights_come_from_the_live_scores_so_the_gate_learns_at_experts_it_did_not_choose(name):
    """The contract's first clause: a replayed expert outside the live top-k still gets gate gradient. Hierarchical
    gating takes 2 experts in its group here: with one, renormalised, the expert's weight is 1 whatever its gate
    says, and the expert gate gets no gradient, replayed or live."""
    node = {"name": name, "top_k": 2} if name == "hierarchical" else {"name": name}
    model = model_with(node, num_experts=8)
    model.train()
    inputs, targets, _ = batch()
    with torch.no_grad(), model.record_routing() as live:
        model(inputs)
    flipped = RoutingTape()  # every token sent to the experts its router ranked lowest
    for (mb, layer), selection in live.selections.items():
        router = next(m.router for m in model.moe_modules() if m.layer == layer)
        others_TK = (selection.expert_ids_TK + 4) % 8  # disjoint from the live choice (E = 8, K <= 2)
        flipped.selections[(mb, layer)] = Selection.from_token_choice(others_TK, selection.token_ids_T)
        assert router.top_k <= 4
    torch.manual_seed(0)
    with model.replay_routing(flipped):
        out = model(inputs, targets)
    out.loss.backward()
    for moe in model.moe_modules():
        selection = flipped.selections[(0, moe.layer)]
        grad_ED = moe.router.gate_ED.grad
        assert grad_ED is not None
        for e in selection.expert_N.unique().tolist():
            assert grad_ED[e].abs().sum() > 0, (name, moe.layer, e)
        # The combine weights are the live router's at the replayed experts.
        assert torch.equal(out.moe[moe.layer].expert_N, selection.expert_N)


def test_the_aux_losses_and_load_statistics_see_the_replayed_selection():
    model = model_with({"name": "topk", "top_k": 2}, num_experts=4, capacity_factor=1.0)
    inputs, _, _ = batch()
    tape = RoutingTape()
    T = B * S
    everyone_on_0_and_1 = torch.tensor([[0, 1]]).expand(T, 2)
    for layer in model.moe_layers:
        tape.selections[(0, layer)] = Selection.from_token_choice(everyone_on_0_and_1)
    with torch.no_grad(), model.replay_routing(tape):
        out = model(inputs)
    capacity = 15  # ceil(1.0 * 30 * 2 / 4)
    for layer in model.moe_layers:
        stats = out.moe[layer]
        assert stats.tokens_per_expert_E.tolist() == [T, T, 0, 0]
        assert float(stats.dropped_slots) == 2 * (T - capacity)  # capacity acts on the replayed selection
    with torch.no_grad():
        h = model.embed(inputs)  # layer 0's input, to recompute its load-balance loss by hand
        h = h + model.blocks[0].attn(model.blocks[0].attn_norm(h), None, None, 0)
        probs_TE = model.blocks[0].ffn.router.gate_logits(model.blocks[0].ffn_norm(h).flatten(0, 1)).softmax(-1)
    expected = load_balance_loss(probs_TE, torch.tensor([T, T, 0, 0]))
    assert torch.allclose(out.moe[0].losses["load_balance"], expected)


def test_a_recording_is_keyed_per_micro_batch_and_layer_for_accumulation_and_recompute():
    model = model_with({"name": "topk", "top_k": 2})
    first, _, _ = batch(1)
    second, _, _ = batch(2)
    tape = RoutingTape()
    with torch.no_grad(), model.record_routing(tape):
        for key, ids in (("step0/mb0", first), ("step0/mb1", second)):
            tape.micro_batch = key
            model(ids)
    assert set(tape.selections) == {(k, l) for k in ("step0/mb0", "step0/mb1") for l in model.moe_layers}
    # Gradient accumulation: each micro-batch replays its own choice.
    tape.micro_batch = "step0/mb1"
    with torch.no_grad(), model.replay_routing(tape):
        assert float(model(second).moe[0].overridden_slots) == 0
        with pytest.raises(ReplayMismatch, match="other tokens"):
            model(first)  # micro-batch 1's recording on micro-batch 0's tokens
    # Activation recompute: the recomputed forward finds the same selection, so the gradients are those of one pass.
    model.train()
    targets = torch.randint(0, V, second.shape)

    def loss_of(ids):
        return F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten())

    with model.replay_routing(tape):
        plain = torch.autograd.grad(loss_of(second), list(model.parameters()), allow_unused=True)
        recomputed_loss = torch.utils.checkpoint.checkpoint(loss_of, second, use_reentrant=False)
        recomputed = torch.autograd.grad(recomputed_loss, list(model.parameters()), allow_unused=True)
    for p, q in zip(plain, recomputed):
        assert (p is None and q is None) or torch.allclose(p, q, atol=1e-7)


def test_a_recording_that_does_not_fit_the_model_is_an_error_never_live_routing():
    model = model_with({"name": "topk", "top_k": 2}, num_experts=4)
    inputs, _, _ = batch()
    with torch.no_grad(), model.record_routing() as tape:
        model(inputs)

    def replay(t: RoutingTape, ids=inputs, on=model):
        with torch.no_grad(), on.replay_routing(t):
            on(ids)

    with pytest.raises(ReplayMismatch, match="other tokens"):  # tokens
        replay(tape, ids=(inputs + 1) % V)
    with pytest.raises(ReplayMismatch, match="30 tokens, the batch 20"):  # token count
        replay(tape, ids=inputs[:2])
    missing = RoutingTape({k: v for k, v in tape.selections.items() if k[1] != model.moe_layers[-1]})
    with pytest.raises(ReplayMismatch, match=f"nothing recorded for layer {model.moe_layers[-1]}"):  # layers
        replay(missing)
    with pytest.raises(ReplayMismatch, match="experts up to 5; the layer has 4"):  # experts
        bad = RoutingTape({k: Selection.from_token_choice(v.expert_ids_TK + 2) for k, v in tape.selections.items()})
        replay(bad)
    with pytest.raises(ReplayMismatch, match="experts up to 7; the layer has 4"):  # another model's experts
        big = model_with({"name": "topk", "top_k": 2}, num_experts=8)
        with torch.no_grad(), big.record_routing() as theirs:
            big(inputs)
        replay(theirs)
    one = model_with({"name": "topk", "top_k": 1}, num_experts=4)
    with pytest.raises(ReplayMismatch, match="2 experts per token; the router takes k=1"):  # k
        replay(tape, on=one)
    choice = model_with({"name": "expert_choice", "causal": True}, num_experts=4)
    with pytest.raises(ReplayMismatch, match="chosen by token, this router chooses by expert"):
        replay(tape, on=choice)


# -- the command line: traces, eval --replay, routing.record / routing.replay ------------------------------------

DATA_FLAGS = ["data.seq_len=64", "data.batch_size=8", "++data.max_chars_per_domain=30000", "data.max_val_blocks=16"]


def test_eval_replaying_a_checkpoints_own_trace_gives_its_own_numbers(real_checkpoint, tmp_path, cache_dir, capsys):
    import json

    from moe_lab.cli.main import main

    data = [*DATA_FLAGS, f"paths.cache_dir={cache_dir}"]
    trace = tmp_path / "trace.parquet"
    ckpt = str(real_checkpoint)
    assert main(["analyze", ckpt, *data, "-o", str(tmp_path / "a.html"), "--trace", str(trace)]) == 0
    assert main(["eval", ckpt, *data, "--json", str(tmp_path / "live.json")]) == 0
    assert main(["eval", ckpt, *data, "--replay", str(trace), "--json", str(tmp_path / "replayed.json")]) == 0
    live = json.loads((tmp_path / "live.json").read_text())
    replayed = json.loads((tmp_path / "replayed.json").read_text())
    assert replayed["overall"] == live["overall"]  # the same loss, bit for bit
    assert replayed["replay"]["overridden_slots"] == 0
    assert all(e["overridden_frac"] == 0 for e in replayed["layers"].values())
    assert "0 of the model's own decisions overridden" in capsys.readouterr().out

    # A trace of other tokens, a damaged file, a trace of another model's shape: one line each, before any work.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(trace)
    shifted = table.set_column(2, "token", pa.compute.add(table["token"], 1))
    pq.write_table(shifted, tmp_path / "other_tokens.parquet")
    assert main(["eval", ckpt, *data, "--replay", str(tmp_path / "other_tokens.parquet")]) == 2
    assert "sequences of this batch are not in" in capsys.readouterr().err
    (tmp_path / "damaged.parquet").write_bytes(trace.read_bytes()[:200])
    assert main(["eval", ckpt, *data, "--replay", str(tmp_path / "damaged.parquet")]) == 2
    err = capsys.readouterr().err
    assert "cannot be read as a Parquet routing trace" in err and "Traceback" not in err
    experts = table["layer1_experts"].combine_chunks()
    wider = pa.ListArray.from_arrays(experts.offsets, pa.compute.add(experts.flatten(), 8).cast(pa.int16()))
    pq.write_table(
        table.set_column(table.column_names.index("layer1_experts"), "layer1_experts", wider), tmp_path / "w.parquet"
    )
    assert main(["eval", ckpt, *data, "--replay", str(tmp_path / "w.parquet")]) == 2
    assert "--replay=" in (err := capsys.readouterr().err) and "the model has 8 experts" in err
    assert main(["eval", ckpt, *data, "--replay", str(tmp_path / "none.parquet")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "null_experts"])
def test_training_replays_a_recorded_run_exactly_and_another_model_under_it(router, make_cfg, tmp_path):
    """Run A records its routing; run B, the same config under routing.replay=A's trace, is A exactly (the same
    selection, the same live weights); run C, another router, trains under A's routing and logs what it overrode.
    With null experts, a token's real experts vary in number (the trace records their slots)."""
    from moe_lab.training.train import train

    trace = tmp_path / "a.parquet"
    common = ("trainer.max_steps=4", "trainer.val_check_interval=2", "metrics.dashboard=false", f"router={router}")
    a = train(make_cfg(*common, f"routing.record={trace}", name="a"))
    assert trace.exists() and not list(tmp_path.glob(".a.parquet*"))
    b = train(make_cfg(*common, f"routing.replay={trace}", name="b"))
    assert b["val/loss"] == a["val/loss"] and b["train/loss"] == a["train/loss"]
    assert overridden_of(tmp_path / "b") == [0.0, 0.0]  # replayed (logged every 3 steps and at the end), not live
    other = "router=aux_free" if router == "topk" else "++model.moe.router.target_experts_per_token=1.5"
    c = train(make_cfg(*common, other, "aux_loss=none", f"routing.replay={trace}", name="c"))
    assert c["val/loss"] != a["val/loss"]
    overridden = overridden_of(tmp_path / "c")
    assert overridden and all(0 < f <= 1 for f in overridden)


def overridden_of(run_dir) -> list[float]:
    import csv

    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return [float(r["moe/overridden_frac"]) for r in csv.DictReader(f) if r.get("moe/overridden_frac")]


def test_routing_settings_are_checked_before_a_run_starts(tmp_path, cache_dir, capsys):
    from moe_lab.cli.main import main

    from conftest import run_cli

    existing = tmp_path / "there.parquet"
    existing.write_bytes(b"x")
    for args, message in (
        ([f"routing.replay={tmp_path / 'none.parquet'}"], "no such file"),
        ([f"routing.record={existing}"], "never writes over a file"),
        ([f"routing.record={tmp_path / 'no' / 'x.parquet'}"], "does not exist"),
        (["experts=dense", f"routing.replay={existing}"], "the model is dense"),
    ):
        assert main(["train", f"hydra.run.dir={tmp_path / 'run'}", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    # A damaged trace is found when the data are read, before the run: in a process of its own, as a user runs it.
    data = [*DATA_FLAGS, f"paths.cache_dir={cache_dir}"]
    damaged = run_cli(["train", f"hydra.run.dir={tmp_path / 'run'}", *data, f"routing.replay={existing}"], tmp_path)
    assert damaged.returncode == 2 and "cannot be read as a Parquet routing trace" in damaged.stderr
    assert "Traceback" not in damaged.stderr
    assert not (tmp_path / "run").exists()


# -- routing stability ---------------------------------------------------------------------------------------------


def stability_batches(n: int = 3, batch_size: int = 4, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [
        {
            "input_ids": torch.randint(0, V, (batch_size, seq + 1), generator=g),
            "domain": torch.randint(0, 2, (batch_size,), generator=g),
            "valid": torch.ones(batch_size, dtype=torch.bool),
        }
        for _ in range(n)
    ]


def test_stability_known_answers_identical_settings_and_the_hash_router_give_zero():
    from moe_lab.tools.stability import stability

    hashed = stability([model_with({"name": "hash", "top_k": 2})], stability_batches(), V, ["hash"])
    for name, c in hashed["comparisons"].items():
        assert c["any_layer"] == 0 and all(v == 0 for v in c["layers"].values()), name
        assert c["top_tokens"] == []
    learned = stability([model_with({"name": "topk", "top_k": 2})], stability_batches(), V, ["topk"])
    assert learned["tokens"] == 3 * 4 * 16
    assert learned["comparisons"]["rerun"]["any_layer"] == 0
    assert learned["comparisons"]["alone"]["any_layer"] == 0  # top-k routes each token on its own
    # Training mode changes a noisy router's choices, and the set of any layer changes at least as often as one's.
    noisy = stability([model_with({"name": "noisy_topk", "top_k": 2})], stability_batches(), V, ["noisy"])
    flips = noisy["comparisons"]["train_mode"]
    assert flips["any_layer"] >= max(flips["layers"].values()) > 0
    assert flips["top_tokens"] and all(0 < t["flip_rate"] <= 1 and t["count"] >= 5 for t in flips["top_tokens"])
    # Expert choice couples the tokens of a batch: alone, a sequence gets other experts.
    choice = stability([model_with({"name": "expert_choice", "top_k": 2})], stability_batches(), V, ["ec"])
    assert choice["comparisons"]["alone"]["any_layer"] > 0


def test_stability_counts_a_flip_by_hand():
    """Two models whose layer 0 differs: the checkpoint comparison counts exactly the tokens whose top-k set differs."""
    from moe_lab.tools.stability import expert_sets, stability

    a, b = model_with({"name": "topk", "top_k": 2}, seed=0), model_with({"name": "topk", "top_k": 2}, seed=3)
    batches = stability_batches(n=1)
    result = stability([a, b], batches, V, ["a", "b"], settings=())
    inputs = batches[0]["input_ids"][:, :-1]
    sets_a, sets_b = expert_sets(a, inputs, None), expert_sets(b, inputs, None)
    expected = [(sets_a[l] != sets_b[l]).any(-1).float().mean().item() for l in range(len(b.moe_layers))]
    assert list(result["comparisons"]) == ["checkpoint a"]
    assert list(result["comparisons"]["checkpoint a"]["layers"].values()) == pytest.approx(expected)


def test_analyze_stability_end_to_end(real_checkpoint, tmp_path, cache_dir, capsys):
    import json

    from moe_lab.cli.main import main

    page = tmp_path / "a.html"
    assert (
        main(
            [
                "analyze",
                str(real_checkpoint),
                *DATA_FLAGS,
                f"paths.cache_dir={cache_dir}",
                "-o",
                str(page),
                "--stability",
                "--max-batches",
                "1",
            ]
        )
        == 0
    )
    report = json.loads(page.with_suffix(".json").read_text())
    comparisons = report["stability"]["comparisons"]
    assert set(comparisons) == {"rerun", "bfloat16", "train_mode", "alone"}
    assert comparisons["rerun"]["any_layer"] == 0 and comparisons["alone"]["any_layer"] == 0
    assert all(0 <= c["any_layer"] <= 1 for c in comparisons.values())
    assert "routing stability over" in capsys.readouterr().out
    assert "Routing stability" in page.read_text()
    rows = (tmp_path / "a.stability.csv").read_text().splitlines()
    assert rows[0] == "layer,comparison,label,changed_share" and len(rows) == 1 + 2 * 4


# -- Parquet traces of every router --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*ALL, "expert_choice_global"])
def test_a_parquet_trace_of_any_router_replays_its_forward_exactly(name, tmp_path):
    """A trace lists each token's experts, as many as it took (none, one, many): written and read back, it replays
    the model's own forward bit for bit, for fixed top-k routers, those whose tokens take a varying number of their
    K slots (whose trace records each expert's slot) and expert choice (each expert's tokens, rebuilt)."""
    import pyarrow.parquet as pq

    from moe_lab.analysis.trace import RoutingTrace
    from moe_lab.training.routing_replay import (
        check_trace_fits,
        layer_choices,
        tape_from_trace,
        trace_writer,
        write_choices,
    )

    node = {"name": "expert_choice"} if name == "expert_choice_global" else router_node(name)
    router = ROUTERS[node["name"]]
    model = model_with(node, capacity_factor=1.0 if router.Config.uses_capacity else None)
    inputs, targets, domain_B = batch()
    with torch.no_grad():
        live = model(inputs, targets, domain_B=domain_B)
    writer = trace_writer(tmp_path / "t.parquet", model, ["a", "b"])
    write_choices(writer, inputs.numpy(), targets.numpy(), domain_B.numpy(), layer_choices(model, live, B, S))
    writer.close()
    trace = RoutingTrace(tmp_path / "t.parquet")
    check_trace_fits(trace, model, "--replay")
    sizes = {trace.experts_per_token(layer) for layer in model.moe_layers}
    if router.Config.fixed_top_k():
        assert sizes == {(model.moe_modules()[0].top_k,) * 2}
    columns = pq.read_schema(tmp_path / "t.parquet").names
    assert (f"layer{model.moe_layers[0]}_slots" in columns) == router.Config.variable_k
    with torch.no_grad(), model.replay_routing(tape_from_trace(trace, inputs, model)):
        replayed = model(inputs, targets, domain_B=domain_B)
    assert torch.equal(replayed.logits, live.logits)
    for layer in model.moe_layers:
        assert float(replayed.moe[layer].overridden_slots) == 0
        assert torch.equal(replayed.moe[layer].tokens_per_expert_E, live.moe[layer].tokens_per_expert_E)
        assert torch.equal(replayed.moe[layer].dropped_slots, live.moe[layer].dropped_slots)


def test_traces_of_varying_expert_sets_that_do_not_fit_are_refused_naming_the_file(tmp_path):
    """A top-p trace on a top-k model (tokens with other than k experts), an expert-choice trace whose experts took
    unequal numbers of tokens, and two experts in one slot: one error naming the file each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe_lab.analysis.trace import RoutingTrace, TraceMismatch
    from moe_lab.training.routing_replay import (
        check_trace_fits,
        layer_choices,
        tape_from_trace,
        trace_writer,
        write_choices,
    )

    def traced(model: MoETransformer, path) -> RoutingTrace:
        inputs, targets, domain_B = batch()
        with torch.no_grad():
            out = model(inputs, targets, domain_B=domain_B)
        writer = trace_writer(path, model, ["a", "b"])
        write_choices(writer, inputs.numpy(), targets.numpy(), domain_B.numpy(), layer_choices(model, out, B, S))
        writer.close()
        return RoutingTrace(path)

    confident = model_with({"name": "top_p", "top_k": 3, "threshold": 0.9})
    with torch.no_grad():
        for moe in confident.moe_modules():
            moe.router.gate_ED.mul_(10)  # scores far from uniform: some tokens take one expert, some more
    top_p = traced(confident, tmp_path / "p.parquet")
    low, high = top_p.experts_per_token(top_p.layers[0])
    assert (low, high) == (1, 3)  # the sets' sizes vary, up to the cap
    with pytest.raises(TraceMismatch, match=f"gives {low} to {high} experts per token .* takes k=2"):
        check_trace_fits(top_p, model_with({"name": "topk", "top_k": 2}), "--replay")
    with pytest.raises(TraceMismatch, match="gives 1 to 3 experts per token in layer 0; the model's router takes 0 to"):
        check_trace_fits(top_p, model_with({"name": "top_p", "top_k": 2, "threshold": 0.9}), "--replay")

    choice = model_with({"name": "expert_choice"})
    path = tmp_path / "c.parquet"
    table = traced(choice, path).path and pq.read_table(path)
    column = f"layer{choice.moe_layers[0]}_experts"
    lists = table[column].combine_chunks()
    values = lists.values.to_numpy().copy()
    values[0] = (values[0] + 1) % 4  # one token moves to another expert: that expert now takes one more
    moved = pa.ListArray.from_arrays(lists.offsets, pa.array(values.astype("int16")))
    pq.write_table(table.set_column(table.column_names.index(column), column, moved), tmp_path / "m.parquet")
    with pytest.raises(TraceMismatch, match="m.parquet: .*same number of tokens per expert"):
        tape_from_trace(RoutingTrace(tmp_path / "m.parquet"), batch()[0], choice)

    relu = model_with({"name": "relu"})
    table = traced(relu, tmp_path / "r.parquet").path and pq.read_table(tmp_path / "r.parquet")
    column = f"layer{relu.moe_layers[0]}_slots"
    lists = table[column].combine_chunks()
    sizes = np.diff(lists.offsets.to_numpy())
    first = int(np.flatnonzero(sizes >= 2)[0])  # a token with two experts: both in its first slot
    values = lists.values.to_numpy().copy()
    start = lists.offsets.to_numpy()[first]
    values[start : start + 2] = 0
    same = pa.ListArray.from_arrays(lists.offsets, pa.array(values.astype("int16")))
    pq.write_table(table.set_column(table.column_names.index(column), column, same), tmp_path / "s.parquet")
    with pytest.raises(TraceMismatch, match="two experts in one routing slot"):
        tape_from_trace(RoutingTrace(tmp_path / "s.parquet"), batch()[0], relu)
