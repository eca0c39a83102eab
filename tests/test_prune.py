"""Expert pruning (moe_lab/model/pruning.py, moe-lab prune): the surgery is removal from the router's choice, each
criterion is its formula, and a pruned model is a checkpoint like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_lab.model import MoETransformer
from moe_lab.model.pruning import per_expert, prune_experts
from moe_lab.model.routers import ROUTERS
from moe_lab.tools.prune import (
    ExpertStats,
    comparable,
    expert_outputs_recorded,
    experts_to_keep,
    experts_to_keep_total,
    removal_losses,
    scores,
)

from conftest import tiny_moe_model

V = 64
PRUNABLE = sorted(n for n, cls in ROUTERS.items() if cls.Config.has_gate)


def model_with(router: dict, num_experts: int = 8, seed: int = 0, **moe) -> MoETransformer:
    """Dropless: pruning changes the number of experts, and with it a capacity limit."""
    return tiny_moe_model(router, num_experts, seed, **{"capacity_factor": None, "eval_capacity_factor": None, **moe})


def ids(batch: int = 3, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def masked_router(model: MoETransformer, removed: dict[int, list[int]]):
    """The oracle: the unpruned model whose routers can never choose the removed experts (their logits -inf)."""
    for layer in model.moe_modules():
        router, mask_E = layer.router, torch.zeros(layer.num_experts)
        mask_E[removed[layer.layer]] = float("-inf")
        plain = router.gate_logits

        def gate_logits(x_TD, weight=None, plain=plain, mask_E=mask_E):
            logits = plain(x_TD, weight)
            return logits if weight is not None else logits + mask_E

        router.gate_logits = gate_logits
    return model


@pytest.mark.parametrize("name", [n for n in PRUNABLE if n != "expert_choice"])
def test_a_pruned_model_routes_as_the_model_whose_router_cannot_choose_the_removed_experts(name):
    node = {"name": name, "num_groups": 2, "top_k": 1} if name == "hierarchical" else {"name": name}
    model = model_with(node)
    keep = (
        {0: [0, 2, 3, 5, 6, 7], 1: [1, 2, 3, 4, 6, 7]}
        if name != "hierarchical"
        else {0: [0, 2, 3, 5, 6, 7], 1: [1, 2, 3, 4, 5, 7]}
    )
    pruned = prune_experts(model, keep)
    assert pruned.cfg.moe.num_experts == 6 and model.cfg.moe.num_experts == 8  # the model is left as it was
    removed = {l: [e for e in range(8) if e not in kept] for l, kept in keep.items()}
    oracle = masked_router(model_with(node), removed)
    x = ids()[:, :-1]
    with torch.no_grad():
        assert torch.allclose(pruned(x).logits, oracle(x).logits, atol=1e-5)
        for layer in pruned.moe_layers:  # expert e of the pruned layer is expert keep[e] of the model
            kept, chosen = torch.tensor(keep[layer]), oracle(x).moe[layer]
            # Soft routing lists every expert (the removed ones with weight 0), top-p slots of no expert (weight 0).
            mine = pruned(x).moe[layer]
            assert torch.equal(kept[mine.expert_N[mine.weight_N > 0]], chosen.expert_N[chosen.weight_N > 0])


@pytest.mark.parametrize("name", ["topk", "top_p", "relu", "soft"])
def test_layers_may_keep_different_numbers_of_experts(name):
    """A total budget: layer 0 keeps 6, layer 1 keeps 3. The pruned model's settings say so (layer_experts), build
    exactly its structure and parameter count, and it routes as the masked oracle; pruning it again per layer or to
    another total works on its narrower layers."""
    node = {"name": name, "top_k": 2} if name in ("topk", "top_p") else {"name": name}
    model = model_with(node)
    keep = {0: [0, 2, 3, 5, 6, 7], 1: [1, 4, 6]}
    pruned = prune_experts(model, keep)
    assert pruned.cfg.moe.num_experts == 6 and pruned.cfg.moe.layer_experts == [6, 3]
    assert [m.num_experts for m in pruned.moe_modules()] == [6, 3] and pruned.layer_experts() == (6, 3)
    assert (
        pruned.num_params()["total"]
        == pruned.cfg.size_estimate()[0]
        == MoETransformer(pruned.cfg).num_params()["total"]
    )
    removed = {l: [e for e in range(8) if e not in kept] for l, kept in keep.items()}
    oracle = masked_router(model_with(node), removed)
    x = ids()[:, :-1]
    with torch.no_grad():
        if name in ("topk", "top_p"):  # routing by a normalised score: the pruned model is the masked one
            assert torch.allclose(pruned(x).logits, oracle(x).logits, atol=1e-5)
        again = prune_experts(pruned, {0: [0, 1], 1: [0, 2]})
        assert again.cfg.moe.layer_experts is None and again.cfg.moe.num_experts == 2
        assert torch.isfinite(again(x).logits).all()


def test_a_total_budget_gives_each_layer_its_minimum_then_the_best_of_any_layer():
    scores_LE = np.array([[0.9, 0.1, 0.5, 0.4], [0.3, 0.2, 0.8, 0.7]])
    assert experts_to_keep_total(scores_LE, 4, [1, 1]) == [[0, 2], [2, 3]]  # 0.9 | 0.8, then 0.7, 0.5
    assert experts_to_keep_total(scores_LE, 3, [2, 0]) == [[0, 2], [2]]
    assert experts_to_keep_total(scores_LE, 2, [1, 1]) == [[0], [2]]
    narrower = np.array([[0.9, 0.1, 0.5, 0.4], [0.3, 0.2, np.nan, np.nan]])  # layer 1 has two experts
    assert experts_to_keep_total(narrower, 5, [1, 1]) == [[0, 2, 3], [0, 1]]
    assert experts_to_keep(narrower, 2) == [[0, 2], [0, 1]]
    # reap and ean over their layer's mean: a layer of large output norms does not take the whole budget.
    norms = np.array([[10.0, 30.0, 20.0, 20.0], [1.0, 3.0, 2.0, 2.0]])
    assert np.allclose(comparable("ean", norms), [[0.5, 1.5, 1.0, 1.0]] * 2)
    assert np.array_equal(comparable("frequency", norms), norms)
    assert experts_to_keep_total(comparable("reap", norms), 4, [1, 1]) == [[1, 2, 3], [1]]  # ties: earlier layer
    norms[1] = [1.0, 3.0, 2.2, 1.8]  # layer 1 over its mean: 0.5, 1.5, 1.1, 0.9
    assert experts_to_keep_total(comparable("reap", norms), 4, [1, 1]) == [[1, 2], [1, 2]]


def test_layer_experts_are_checked_with_the_model():
    from moe_lab.model import ModelConfig, MoEConfig

    def cfg(**moe):
        return ModelConfig(
            vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, moe=MoEConfig(expert_hidden=16, **moe)
        )

    for moe, message in (
        ({"num_experts": 6, "layer_experts": [6]}, "for each of the 2 MoE blocks"),
        ({"num_experts": 8, "layer_experts": [6, 4]}, "must be the largest"),
        ({"num_experts": 6, "layer_experts": [6, 0]}, "for each of the 2 MoE blocks"),
        ({"num_experts": 6, "layer_experts": [6, 1], "router": {"name": "topk", "top_k": 2}}, "block 1's 1 experts"),
        ({"num_experts": 6, "layer_experts": [6, 3], "expert_parallel": 2}, "must divide every layer's"),
    ):
        with pytest.raises(ValueError, match=message):
            cfg(**moe).check()
    cfg(num_experts=6, layer_experts=[6, 2], router={"name": "topk", "top_k": 2}).check()


def test_per_expert_tensors_are_found_by_their_shape_suffix():
    assert per_expert("router.gate_ED") and per_expert("experts.w_in_EGFD") and per_expert("router.bias_E")
    assert (
        not per_expert("router.table_VK") and not per_expert("router.group_gate_GD") and not per_expert("norm.weight")
    )
    model = model_with({"name": "aux_free"})
    model.moe_modules()[0].router.bias_E.copy_(torch.arange(8.0))
    pruned = prune_experts(model, {0: [1, 4, 5, 7], 1: [0, 1, 2, 3]})
    assert pruned.moe_modules()[0].router.bias_E.tolist() == [1.0, 4.0, 5.0, 7.0]
    gate = model.moe_modules()[1].router.gate_ED
    assert torch.equal(pruned.moe_modules()[1].router.gate_ED, gate[:4])


def test_group_limited_routing_keeps_whole_equal_groups_and_fixed_tables_are_refused():
    model = model_with({"name": "aux_free", "num_groups": 2, "topk_groups": 1, "top_k": 2})
    pruned = prune_experts(model, {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]})
    assert pruned.moe_modules()[0].router.cfg.num_groups == 2
    with pytest.raises(ValueError, match="keep as many of each"):
        prune_experts(model, {0: [0, 1, 2, 4], 1: [2, 3, 6, 7]})
    scores_LE = np.array([[8, 7, 6, 5, 1, 2, 3, 4.0]] * 2)
    assert experts_to_keep(scores_LE, 4, groups=2) == [[0, 1, 6, 7]] * 2
    assert experts_to_keep(scores_LE, 3) == [[0, 1, 2]] * 2
    with pytest.raises(ValueError, match="fixed table"):
        prune_experts(model_with({"name": "hash"}), {0: [0, 1], 1: [0, 1]})
    with pytest.raises(ValueError, match="top_k=2 must be in 1..num_experts \\(1\\)"):
        prune_experts(model_with({"name": "topk", "top_k": 2}), {0: [0], 1: [0]})


def test_each_criterion_is_its_formula():
    model = model_with({"name": "topk", "top_k": 2})
    batches = [ids(seed=s) for s in range(2)]
    # By hand: one forward with hooks off, each slot's expert output and weight from the layer itself.
    expected = ExpertStats.zeros(2, 8)
    with torch.no_grad():
        for block in batches:
            out = model(block[:, :-1])
            h = model.embed(block[:, :-1])
            for l, b in enumerate(model.blocks):
                x = h + b.attn(b.attn_norm(h), None, None, b.layer)
                z = b.ffn_norm(x).flatten(0, 1)
                stats = out.moe[b.layer]
                for slot in range(stats.expert_N.numel()):
                    e, t, w = int(stats.expert_N[slot]), int(stats.token_N[slot]), float(stats.weight_N[slot])
                    norm = float(b.ffn.experts.expert_forward(e, z[t : t + 1]).norm())
                    expected.slots_LE[l, e] += 1
                    expected.gated_norm_LE[l, e] += w * norm
                    expected.norm_LE[l, e] += norm
                h = x + b.ffn(b.ffn_norm(x))[0]
    assert np.allclose(scores("frequency", model, batches), expected.slots_LE / expected.slots_LE.sum(1, keepdims=True))
    assert np.allclose(scores("reap", model, batches), expected.gated_norm_LE / expected.slots_LE, rtol=1e-5)
    assert np.allclose(scores("ean", model, batches), expected.norm_LE, rtol=1e-5)
    recorded = ExpertStats.zeros(2, 8)
    with expert_outputs_recorded(model, recorded):
        pass
    assert recorded.slots_LE.sum() == 0  # the hooks are gone after the block
    random = scores("random", model, batches, seed=3)
    assert random.shape == (2, 8) and np.array_equal(random, scores("random", model, batches, seed=3))


def test_the_loss_criterion_measures_the_model_without_each_expert():
    model = model_with({"name": "topk", "top_k": 2, "gate_bias": True})
    with torch.no_grad():  # expert 5 of layer 0 can never be chosen: removing it changes nothing
        model.moe_modules()[0].router.gate_bias_E[5] = -1e4
    batches = [ids()]
    from moe_lab.tools.prune import held_out_loss

    base = held_out_loss(model, batches)
    losses = removal_losses(model, batches)
    assert losses.shape == (2, 8) and model.cfg.moe.num_experts == 8 and len(model.moe_modules()[0].router.gate_ED) == 8
    others = [e for e in range(8) if e != 3]
    by_hand = prune_experts(model, {0: others, 1: others})  # both layers: not the same model as removing one
    assert held_out_loss(by_hand, batches) != losses[0, 3]
    assert abs(losses[0, 5] - base) < 1e-6 and np.all(losses != 0)


@pytest.mark.slow
def test_prune_command_writes_a_checkpoint_that_works_everywhere(real_checkpoint, tmp_path, cache_dir, capsys):
    from moe_lab.cli.main import main
    from moe_lab.training.checkpoint import load_model

    data = [
        "data.seq_len=64",
        "data.max_val_blocks=16",
        "++data.max_chars_per_domain=30000",
        f"paths.cache_dir={cache_dir}",
    ]
    out = tmp_path / "pruned"
    assert main(["prune", str(real_checkpoint), str(out), *data, "--keep", "4", "--max-batches", "1"]) == 0
    report = json.loads((out / "pruning.json").read_text())
    assert report["criterion"] == "reap" and all(len(e["kept"]) == 4 for e in report["layers"].values())
    module = load_model(out / "model.ckpt")
    assert module.model.cfg.moe.num_experts == 4
    assert main(["eval", str(out / "model.ckpt"), *data, "--max-batches", "1", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["overall"]["loss"] == pytest.approx(report["loss_after"])
    assert main(["generate", str(out / "model.ckpt"), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    assert main(["analyze", str(out / "model.ckpt"), *data, "--max-batches", "1", "-o", str(tmp_path / "a.html")]) == 0
    assert main(["export", str(out / "model.ckpt"), "--format", "hf", str(tmp_path / "hf")]) == 0
    assert (
        main(
            [
                "train",
                f"ckpt_path={out / 'model.ckpt'}",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                *data,
                "data.batch_size=4",
                "metrics.dashboard=false",
                f"hydra.run.dir={tmp_path / 'ft'}",
            ]
        )
        == 0
    )
    # Refusals: a used output folder, too many experts kept; one line each, nothing written.
    assert main(["prune", str(real_checkpoint), str(out), "--keep", "4"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["prune", str(real_checkpoint), str(tmp_path / "x"), "--keep", "8"]) == 2
    assert "keep 1 to 7 of the model's 8 experts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_total_budget_writes_a_model_whose_layers_differ_and_that_works_everywhere(
    real_checkpoint, tmp_path, cache_dir, capsys
):
    """--keep-total 13 of the test model's 2 x 8 experts: the layers keep different numbers (13 is odd); the model
    evaluates to the loss the report states, generates, is analysed and traced, replays its trace, fine-tunes (with
    its dashboard), prunes again per layer; export says in one line why Hugging Face's formats cannot hold it."""
    from moe_lab.cli.main import main
    from moe_lab.training.checkpoint import load_model

    data = [
        "data.seq_len=64",
        "data.max_val_blocks=16",
        "++data.max_chars_per_domain=30000",
        f"paths.cache_dir={cache_dir}",
    ]
    out, ckpt = tmp_path / "pruned", str(tmp_path / "pruned" / "model.ckpt")
    args = ["prune", str(real_checkpoint), str(out), *data, "--keep-total", "13", "--criterion", "frequency"]
    assert main([*args, "--max-batches", "1"]) == 0
    report = json.loads((out / "pruning.json").read_text())
    assert sum(report["kept"]) == 13 and len(set(report["kept"])) > 1 and min(report["kept"]) >= 2  # top-2
    assert "13 of 16 experts (per layer: " in capsys.readouterr().out
    model = load_model(ckpt).model
    assert [m.num_experts for m in model.moe_modules()] == report["kept"]
    assert model.cfg.moe.layer_experts == report["kept"] and model.cfg.moe.num_experts == max(report["kept"])
    one = ["--max-batches", "1"]
    assert main(["eval", ckpt, *data, *one, "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["overall"]["loss"] == pytest.approx(report["loss_after"])
    assert main(["generate", ckpt, "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    trace = tmp_path / "t.parquet"
    assert main(["analyze", ckpt, *data, *one, "-o", str(tmp_path / "a.html"), "--trace", str(trace)]) == 0
    analysed = json.loads((tmp_path / "a.json").read_text())["layers"]
    for layer, kept in zip(model.moe_layers, report["kept"]):
        loads = analysed[str(layer)]["expert_tokens"] if "expert_tokens" in analysed[str(layer)] else None
        assert loads is None or len(loads) >= kept
    assert main(["eval", ckpt, *data, *one, "--replay", str(trace), "--json", str(tmp_path / "r.json")]) == 0
    assert (
        json.loads((tmp_path / "r.json").read_text())["overall"]
        == json.loads((tmp_path / "e.json").read_text())["overall"]
    )
    capsys.readouterr()
    assert main(["export", ckpt, "--format", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "different numbers of experts" in err and "--keep N" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()
    ft = [f"ckpt_path={ckpt}", "trainer.max_steps=2", "trainer.val_check_interval=2", *data, "data.batch_size=4"]
    assert main(["train", *ft, f"hydra.run.dir={tmp_path / 'ft'}"]) == 0  # with its dashboard
    assert main(["prune", ckpt, str(tmp_path / "again"), *data, *one, "--keep", "2"]) == 0
    assert load_model(tmp_path / "again" / "model.ckpt").model.cfg.moe.layer_experts is None
    assert main(["prune", ckpt, str(tmp_path / "x"), "--keep", str(min(report["kept"]))]) == 2
    assert f"keep 1 to {min(report['kept']) - 1} of the model's" in capsys.readouterr().err
    assert main(["prune", str(real_checkpoint), str(tmp_path / "y"), "--keep-total", "3"]) == 2
    assert "--keep-total 3: keep 4 (the fewest router=topk routes with" in capsys.readouterr().err
    assert main(["prune", str(real_checkpoint), str(tmp_path / "z"), "--keep", "2", "--keep-total", "9"]) == 2
    assert "give --keep N" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "xyz")


@pytest.mark.slow
def test_an_imported_model_prunes_and_exports_with_its_tokenizer(tmp_path, cache_dir):
    from test_import import save_hf_model
    from transformers import AutoModelForCausalLM

    from moe_lab.cli.main import main
    from moe_lab.tools.hf_import import import_hf

    save_hf_model("qwen2_moe", tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), tmp_path / "imported")
    data = [
        "data.seq_len=32",
        "data.max_val_blocks=8",
        "++data.max_chars_per_domain=20000",
        f"paths.cache_dir={cache_dir}",
    ]
    for source, out in ((tmp_path / "imported" / "model.ckpt", "p1"), (tmp_path / "hf", "p2")):
        assert (
            main(
                [
                    "prune",
                    str(source),
                    str(tmp_path / out),
                    *data,
                    "--keep",
                    "2",
                    "--criterion",
                    "frequency",
                    "--max-batches",
                    "1",
                ]
            )
            == 0
        )
        assert (tmp_path / out / "tokenizer" / "tokenizer.json").is_file()
        assert main(["eval", str(tmp_path / out / "model.ckpt"), *data, "--max-batches", "1"]) == 0
    assert main(["export", str(tmp_path / "p1" / "model.ckpt"), "--format", "hf", str(tmp_path / "back")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert hf.config.num_experts == 2


def test_the_loss_criterion_is_refused_for_group_limited_routing():
    from moe_lab.errors import UserError
    from moe_lab.tools.prune import check_keep

    model = model_with({"name": "aux_free", "num_groups": 2, "topk_groups": 1, "top_k": 2})
    with pytest.raises(ValueError, match="groups of experts unequal"):
        removal_losses(model, [ids()])
    with pytest.raises(UserError, match="use reap, ean, frequency or random"):
        check_keep(model, 4, "loss")
    check_keep(model, 4, "reap")
    with pytest.raises(UserError, match="keep a multiple of 2"):
        check_keep(model, 3, "reap")
