"""Upcycling a dense model into an MoE, and the fine-tuning controls (frozen parts, learning-rate multipliers)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from moe_lab.errors import UserError
from moe_lab.model import ModelConfig, MoETransformer
from moe_lab.model.upcycled_weights import moe_settings, upcycled_state_dict
from moe_lab.training.schemas import config_dir, validate
from moe_lab.training.train import train


def dense_model() -> tuple[ModelConfig, MoETransformer]:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        {
            "vocab_size": 80,
            "d_model": 32,
            "n_heads": 4,
            "n_layers": 3,
            "ffn_hidden": 64,
            "max_seq_len": 32,
            "moe": {"enabled": False},
        }
    )
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return cfg, model


def upcycled(method: str, num_experts: int, top_k: int, granularity: int = 1, normalize: bool = True, **moe):
    dense_cfg, dense = dense_model()
    wanted = ModelConfig.from_dict(
        {
            "moe": {
                "num_experts": num_experts,
                "capacity_factor": None,
                "eval_capacity_factor": None,
                "first_dense_layers": 1,
                **moe,
                "router": {"name": "topk", "top_k": top_k, "normalize": normalize},
            }
        }
    )
    cfg = moe_settings(dense_cfg, wanted, method, granularity)
    model = MoETransformer(cfg).eval()
    model.load_state_dict(upcycled_state_dict(dense.state_dict(), dense_cfg, cfg, method, granularity, seed=3))
    return dense, model


IDS = torch.randint(0, 80, (4, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    "method, experts, top_k, granularity",
    [
        ("copy", 4, 2, 1),
        ("copy", 8, 1, 1),  # sparse upcycling: any top-k, weights renormalised
        ("granular", 4, 2, 2),
        ("granular", 8, 4, 2),  # whole copies of the shards are picked (top_k a multiple of G)
        ("granular", 4, 4, 4),  # all experts active: the dense FFN in four shards
    ],
)
def test_upcycling_keeps_the_dense_function(method, experts, top_k, granularity):
    dense, model = upcycled(method, experts, top_k, granularity)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, dense(IDS).logits, rtol=1e-5, atol=1e-5)
    assert model.cfg.moe.expert_hidden == 64 // granularity and model.moe_layers == [1, 2]


def test_what_breaks_the_dense_function_does():
    dense, model = upcycled("copy", 4, 2, normalize=False)  # weights not renormalised: a scaled FFN
    with torch.no_grad():
        assert (model(IDS).logits - dense(IDS).logits).abs().max() > 1e-2
    dense, model = upcycled("granular", 4, 1, 2)  # top-1 picks half of a copy
    with torch.no_grad():
        assert (model(IDS).logits - dense(IDS).logits).abs().max() > 1e-2


def test_drop_upcycling_reinitialises_a_share_of_each_expert():
    dense, model = upcycled("drop", 4, 2)
    w_in = dense.blocks[1].ffn.w_in.weight.detach()  # (2F, D): gate rows, then up rows
    experts = model.blocks[1].ffn.experts.w_in_EGFD.detach()
    kept = [(experts[e, :64] == w_in[:64]).all(dim=1) for e in range(4)]
    for e in range(4):
        assert int(kept[e].sum()) == 32  # half of the 64 hidden units re-initialised
        assert torch.equal((experts[e, 64:] == w_in[64:]).all(dim=1), kept[e])  # the same units of gate and up
    assert len({tuple(k.tolist()) for k in kept}) == 4  # a different choice per expert
    fresh = experts[0, :64][~kept[0]]
    assert abs(float(fresh.std()) - float(w_in[:64].std())) < 0.05  # the dense weights' statistics


def test_upcycling_settings_that_cannot_work_are_refused():
    dense_cfg, _ = dense_model()
    moe = ModelConfig.from_dict({"moe": {"num_experts": 6}})
    with pytest.raises(ValueError, match="num_experts=6 must be a multiple of upcycle.granularity=4"):
        moe_settings(dense_cfg, moe, "granular", 4)
    with pytest.raises(ValueError, match="granularity=3 must divide the dense FFN's 64"):
        moe_settings(dense_cfg, moe, "granular", 3)
    with pytest.raises(ValueError, match="already an MoE"):
        moe_settings(ModelConfig(), moe, "copy")
    with pytest.raises(ValueError, match="shared experts is not supported yet"):
        moe_settings(dense_cfg, ModelConfig.from_dict({"moe": {"num_shared": 1}}), "copy")


def test_an_upcycled_run_starts_at_the_dense_runs_loss(make_cfg, tmp_path):
    """The defining property end to end: step 0 of `model.init_from=DENSE upcycle=copy` (dropless) has the dense
    run's final validation loss."""
    dense = train(make_cfg("experts=dense", "trainer.max_steps=6", "metrics.dashboard=false", name="dense"))
    ckpt = dense["checkpoint"]
    up = train(
        make_cfg(
            f"model.init_from={ckpt}",
            "upcycle=copy",
            "experts=e4",
            "capacity=dropless",
            "trainer.max_steps=2",
            "metrics.dashboard=false",
            name="up",
        )
    )
    assert up["initial_val_loss"] == pytest.approx(dense["val/loss"], rel=1e-5)
    saved = torch.load(up["checkpoint"], weights_only=True)["hyper_parameters"]["model"]
    assert saved["moe"]["enabled"] and saved["moe"]["expert_hidden"] == saved["ffn_hidden"] == 128
    assert saved["d_model"] == 64 and saved["init_from"] == ckpt
    # Without upcycle=: a warm start of the same model (here the dense one), from its weights, at step 0.
    warm = train(make_cfg(f"model.init_from={ckpt}", "trainer.max_steps=2", "metrics.dashboard=false", name="warm"))
    assert warm["initial_val_loss"] == pytest.approx(dense["val/loss"], rel=1e-6) and warm["step"] == 2
    assert not torch.load(warm["checkpoint"], weights_only=True)["hyper_parameters"]["model"]["moe"]["enabled"]
    with pytest.raises(UserError, match="upcycle=copy needs model.init_from"):
        train(make_cfg("upcycle=copy", name="x"))
    with pytest.raises(UserError, match="already an MoE"):
        train(make_cfg(f"model.init_from={up['checkpoint']}", "upcycle=copy", name="y"))


def test_upcycling_a_hugging_face_dense_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from moe_lab.interop.huggingface import model_config, state_dict

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    dense_cfg = model_config(hf.config, dense=True)
    assert dense_cfg.qkv_bias and not dense_cfg.moe.enabled
    wanted = ModelConfig.from_dict(
        {
            "moe": {
                "num_experts": 4,
                "capacity_factor": None,
                "eval_capacity_factor": None,
                "router": {"name": "topk", "top_k": 2},
            }
        }
    )
    cfg = moe_settings(dense_cfg, wanted, "copy")
    model = MoETransformer(cfg).eval()
    model.load_state_dict(upcycled_state_dict(state_dict(hf.state_dict(), dense_cfg), dense_cfg, cfg, "copy"))
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_frozen_parts_do_not_move_and_multipliers_scale_the_step(make_cfg, tmp_path):
    summary = train(
        make_cfg(
            "optim.freeze=[router,embeddings]",
            "+optim.lr_mult.experts=0.1",
            "trainer.max_steps=3",
            "optim.warmup_steps=0",
            "metrics.dashboard=false",
            name="ft",
        )
    )
    start = train(make_cfg("trainer.max_steps=1", "optim.lr=1e-9", "metrics.dashboard=false", name="ref"))
    # Same seed: the same initial weights. Compare where the fine-tuned run ended against them.
    a = torch.load(summary["checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(start["checkpoint"], weights_only=True)["state_dict"]
    for name in a:
        moved = float((a[name] - b[name]).abs().max())
        if ".router." in name or name == "model.embed.weight":
            assert moved < 1e-6, name  # frozen (the reference moved by lr 1e-9 at most)
        elif ".attn." in name:
            assert moved > 1e-4, name
    assert summary["frozen"] == ["embeddings", "router"] and summary["lr_mult"] == {"experts": 0.1}
    assert summary["trainable_params"] < summary["params"]["total"]
    with pytest.raises(UserError, match="'routers' is not a part of the model"):
        train(make_cfg("optim.freeze=[routers]", name="bad"))


def test_lr_multipliers_make_parameter_groups():
    from moe_lab.training.module import MoELanguageModel, part_of

    module = MoELanguageModel(model=ModelConfig(vocab_size=64), optim={"lr": 1e-3, "lr_mult": {"router": 0.1}})
    groups = module.parameter_groups()
    assert groups[0]["lr_mult"] == 1.0 and groups[0]["lr"] == 1e-3
    router = [g for g in groups if g["lr_mult"] == 0.1]
    assert len(router) == 1 and router[0]["lr"] == pytest.approx(1e-4)
    names = {id(p): n for n, p in module.named_parameters()}
    assert {part_of(names[id(p)]) for p in router[0]["params"]} == {"router"}
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
    assert json.dumps(module.parts())  # plain data, for the summary
    assert dataclasses.is_dataclass(module.optim_cfg)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory, cache_dir) -> str:
    from conftest import compose_cfg

    out = tmp_path_factory.mktemp("dense")
    return train(
        compose_cfg(["experts=dense", "trainer.max_steps=1", "metrics.dashboard=false"], out / "run", cache_dir)
    )["checkpoint"]


@pytest.mark.parametrize("option", sorted(p.stem for p in (Path(config_dir()) / "upcycle").glob("*.yaml")))
def test_every_upcycle_option_composes_and_applies(make_cfg, dense_checkpoint, option):
    from moe_lab.training.init_from import apply_upcycling

    run = validate(
        make_cfg(f"model.init_from={dense_checkpoint}", f"upcycle={option}", "experts=e4", "model.moe.router.top_k=2")
    )
    weights = apply_upcycling(run)
    assert run.model.moe.enabled and run.model.d_model == 64 and run.upcycle.method == option
    assert run.model.moe.expert_hidden == 128 // (2 if option == "granular" else 1)
    model = MoETransformer(run.model)
    model.load_state_dict(weights())
