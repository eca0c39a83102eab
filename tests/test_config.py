"""Every option of every config group composes, validates and instantiates; every bad input gets one clear error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from moe_lab.cli.preflight import preflight
from moe_lab.errors import ConfigError
from moe_lab.model import MoETransformer
from moe_lab.training.module import MoELanguageModel
from moe_lab.training.schemas import config_dir, validate

from conftest import router_options, router_partners

CONF = Path(config_dir())
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> list[str]:
    if group == "router":  # a registered router is an option with or without a conf/router/NAME.yaml
        return router_options()
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_the_contracted_groups_and_options_exist():
    assert {
        "model",
        "router",
        "experts",
        "capacity",
        "aux_loss",
        "data",
        "trainer",
        "logger",
        "experiment",
        "hparams_search",
    } <= set(GROUPS)
    assert {"tiny", "dense_tiny", "small", "base"} <= set(options("model"))
    assert "topk" in options("router")
    assert {"e4", "e8", "e16", "e64_fine", "dense"} <= set(options("experts"))
    assert {"dropless", "cf1_0", "cf1_25", "cf2_0"} <= set(options("capacity"))
    assert {"none", "switch", "z", "switch_z"} <= set(options("aux_loss"))
    assert {"cpu", "gpu", "ddp"} <= set(options("trainer"))
    assert {"csv", "wandb", "tensorboard"} <= set(options("logger"))


def test_defaults(make_cfg):
    cfg = make_cfg(fast=False)
    run = validate(cfg)
    assert run.model.moe.num_experts == 8
    assert dataclasses.asdict(run.model.moe.router) == {
        "name": "topk",
        "top_k": 2,
        "normalize": True,
        "score": "softmax",
        "num_groups": 1,
        "topk_groups": 1,
        "scaling_factor": 1.0,
        "gate_bias": False,
    }
    assert run.model.moe.capacity_factor == 1.25 and run.model.moe.eval_capacity_factor == 2.0
    assert (run.model.moe.aux_loss.load_balance, run.model.moe.aux_loss.z_loss) == (1e-2, 1e-3)
    assert run.model.moe.expert_hidden == run.model.ffn_hidden  # interpolated from the model preset
    assert run.seed == 1234 and run.data.source == "embedded" and run.trainer["accelerator"] == "cpu"


def build_model(run) -> MoETransformer:
    cfg = run.model
    cfg.vocab_size = 320
    return MoETransformer(cfg)


# Options that only make sense together with another choice.
PARTNER = {
    ("aux_loss", "cv"): ["router=noisy_topk"],
    **{("router", option): router_partners(option) for option in router_options()},
}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in ["model", "router", "experts", "capacity", "aux_loss"] for o in options(g)]
)
def test_every_model_option_instantiates_and_runs(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}", *PARTNER.get((group, option), []), fast=False)
    run = validate(cfg)
    if group == "model" and option in ("small", "base"):  # keep the test small: shrink depth and width
        run.model.n_layers, run.model.d_model, run.model.n_heads, run.model.n_kv_heads = 2, 64, 4, None
        run.model.ffn_hidden = 128
        run.model.moe.expert_hidden = 64
    model = build_model(run)
    out = model(torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16)), domain_B=torch.tensor([0, 1]))
    assert torch.isfinite(out.loss)
    if option == "dense" or option == "dense_tiny":
        assert model.moe_layers == []
    if option == "e64_fine":
        assert run.model.moe.num_experts == 64 and run.model.moe.router.top_k == 8
        assert run.model.moe.expert_hidden == run.model.ffn_hidden // 8
    if group == "aux_loss" and option != "none":
        weighted = {k for k, v in run.model.moe.aux_loss.weights().items() if v > 0}
        assert weighted <= set(out.aux_losses) and out.aux_loss is not None


@pytest.mark.parametrize("option", options("trainer"))
def test_every_trainer_option_instantiates(make_cfg, option):
    run = validate(make_cfg(f"trainer={option}", fast=False))
    if option == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU here; trainer=gpu composed and validated")
    if option in ("ddp", "fsdp"):
        run.trainer["accelerator"] = "cpu"
    from moe_lab.training.train import trainer_arguments

    trainer = L.Trainer(
        **trainer_arguments(run),  # moe-lab's strategies for ddp and fsdp
        logger=False,
        enable_checkpointing=False,
        max_epochs=-1,
        check_val_every_n_epoch=None,
        use_distributed_sampler=False,
    )
    assert trainer.max_steps == run.trainer["max_steps"]


@pytest.mark.parametrize("option", options("logger"))
def test_every_logger_option_instantiates(make_cfg, tmp_path, monkeypatch, option):
    pytest.importorskip("tensorboard") if option == "tensorboard" else None
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = validate(make_cfg(f"logger={option}", f"paths.output_dir={tmp_path}"))
    loggers = [instantiate(node) for node in run.logger.values()]
    assert {type(lg).__name__ for lg in loggers} >= {"CSVLogger"}


@pytest.mark.parametrize("option", options("data"))
def test_every_data_option_composes(make_cfg, option, tmp_path):
    extra = {"text": [f"data.path={tmp_path}/*.txt"], "hf": ["data.name=json"]}.get(option, [])
    run = validate(make_cfg(f"data={option}", *extra, fast=False))
    assert run.data.source == option


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_composes(make_cfg, option):
    run = validate(make_cfg(f"experiment={option}", fast=False))
    assert run.run_name == option
    build_model(run)


@pytest.mark.parametrize("option", options("hparams_search"))
def test_every_hparams_search_composes(make_cfg, option):
    cfg = make_cfg(f"hparams_search={option}")
    validate(cfg)


def test_command_line_wins_over_experiment(make_cfg):
    run = validate(make_cfg("experiment=switch_e16", "experts=e8", fast=False))
    assert run.model.moe.num_experts == 8 and run.model.moe.router.top_k == 1


def test_lightning_module_checkpoint_hparams_are_plain(make_cfg):
    run = validate(make_cfg())
    run.model.vocab_size = 320
    module = MoELanguageModel(model=dataclasses.asdict(run.model), optim=dataclasses.asdict(run.optim))
    json.dumps(dict(module.hparams))  # plain data only: no pickled objects in checkpoints


# --------------------------------------------------------------------------------------------------------
# Bad input: one message that names the key and what is allowed, before anything runs or is written


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model.moe.router.top_k=9"], "model.moe.router.top_k=9 must be in 1..num_experts (8)"),
        (["model.moe.router.top_k=0"], "must be in 1..num_experts"),
        (["model.moe.capacity_factor=0"], "model.moe.capacity_factor=0.0 must be > 0"),
        (["model.moe.eval_capacity_factor=-1"], "model.moe.eval_capacity_factor=-1.0 must be > 0"),
        (["model.moe.num_experts=0"], "model.moe.num_experts=0 must be at least 1"),
        (["data.seq_len=1024"], "data.seq_len=1024 is longer than the model's maximum model.max_seq_len=512"),
        (["+model.moe.foo=1"], "model.moe.foo is not a setting; the settings of model.moe are: ['activation'"),
        (
            ["+model.moe.router.normalise=true"],
            "model.moe.router.normalise is not a setting; the settings of "
            "model.moe.router are: ['gate_bias', 'name', 'normalize', 'num_groups'",
        ),
        (["router=switch", "model.moe.router.top_k=2"], "router=switch sends each token to one expert"),
        (["router=hash", "aux_loss=switch_z"], "router=hash has no learned gate, so no router loss applies"),
        (["aux_loss=cv"], "model.moe.aux_loss.load (Shazeer's smooth load) needs router=noisy_topk"),
        (["router=expert_choice", "aux_loss=seq"], "aux_loss.seq_load_balance needs token-choice routing"),
        (["router=hierarchical", "model.moe.router.num_groups=3"], "num_groups=3 must be at least 2 and divide"),
        (["model.moe.router.num_groups=3"], "model.moe.router.num_groups=3 must divide num_experts (8)"),
        (["model.moe.router.score=tanh"], "model.moe.router.score='tanh'; choose softmax or sigmoid"),
        (["model.moe.drop_policy=random"], "model.moe.drop_policy='random'; choose position or probability"),
        (["model.moe.shared_gate=true"], "model.moe.shared_gate=true gates the shared experts"),
        (
            ["trainer=ddp", "model.moe.expert_parallel=3"],
            "model.moe.expert_parallel=3 must divide model.moe.num_experts=8",
        ),
        (
            ["trainer=ddp", "trainer.devices=2", "model.moe.expert_parallel=4"],
            "must divide the world size trainer.devices",
        ),
        (["model.moe.expert_parallel=2"], "model.moe.expert_parallel=2 needs several processes: add trainer=ddp"),
        (["trainer=fsdp", "model.moe.implementation=loop"], "trainer=fsdp runs the grouped experts"),
        (["model.moe.layer_experts=[8,3]"], "must give a number of experts (>= 1) for each of the 4 MoE blocks"),
        (["model.moe.layer_experts=[8,8,8,1]"], "block 3's 1 experts: model.moe.router.top_k=2 must be in 1..num"),
        (["+fooo=1"], "'fooo' is not a setting; the top-level settings are"),
        (["+trainer.foo=1"], "trainer.foo is not a Lightning Trainer argument"),
        (["model.moe.expert_hidden=30"], "must be a multiple of 8"),
        (["data=text"], "data=text needs a file"),
    ],
)
def test_validate_rejects_bad_input(make_cfg, overrides, expected):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides, fast=False))
    assert expected in str(e.value)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["model.moe.foo=1"], "model.moe.foo is not a setting; the settings of model.moe are: ['activation'"),
        (
            ["experts=e99"],
            "experts=e99 is not an option; the options of experts are: dense, e16, e16_fine, e16_fine_gated_shared, "
            "e16_fine_shared, e16_grouped_shared, e16_latent, e4, e64_fine, e64_fine_shared, e8",
        ),
        (
            ["router=nope"],
            "router=nope is not an option; the options of router are: aux_free, domain_oracle, dtop_p, expert_choice",
        ),
        (["model.moe.router.top_k=9"], "model.moe.router.top_k=9 must be in 1..num_experts (8)"),
        (["-m", "experts=e4,e99"], "experts=e99 is not an option"),
        (["-m", "model.moe.router.top_k=1,9"], "model.moe.router.top_k=9 must be in 1..num_experts"),
        (["model.moe.router.top_k=1,2"], "is a sweep: add -m"),
        (["data=text", "data.path=/no/such/*.txt"], "data.path=/no/such/*.txt: no such file"),
        (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt: no such checkpoint file"),
        (["trainer.max_steps=0"], "trainer.max_steps=0 must be a positive number"),
        (["model.moe.router.top_k=abc"], "model.moe.router.top_k: Value 'abc'"),
        (
            ["data=hf", "data.path=x"],
            "data.path is not a setting; the settings of data are: ['batch_size', 'data_files'",
        ),
        (["+model.moe.router.normalise=true"], "model.moe.router.normalise is not a setting"),
        # A misspelt name: the closest config group or setting is named.
        (["routr=topk"], "routr is not a setting (did you mean the config group router, as in router=OPTION?)"),
        (["model.moe.routr.top_k=2"], "model.moe.routr.top_k is not a setting (did you mean model.moe.router?)"),
        (["sed=3"], "sed is not a setting (did you mean seed?)"),
        # Lightning's fast_dev_run turns off what a run writes its folder with: refused before any work.
        (["+trainer.fast_dev_run=true"], "trainer.fast_dev_run=True turns off the loggers and checkpoints"),
    ],
)
def test_preflight_messages(args, expected):
    message = preflight(args)
    assert message is not None and expected in message, message
    assert "\n" not in message  # one line, not a traceback


def test_preflight_passes_good_input_and_show_only_flags():
    assert preflight(["experts=e16", "model.moe.router.top_k=1", "capacity=cf1_25", "aux_loss=switch_z"]) is None
    assert preflight(["-m", "experts=e4,e8", "aux_loss=none,switch"]) is None
    assert preflight(["--help", "experts=e99"]) is None  # Hydra shows its help; nothing runs
    assert preflight(["--cfg", "job", "experts=e16"]) is None


def test_cfg_job_with_a_mistake_is_one_line_and_claims_nothing(tmp_path):
    """`moe-lab train --cfg job` (the README's way to see a config) reports a mistake as moe-lab's line."""
    message = preflight(["--cfg", "job", "experts=e99", f"hydra.run.dir={tmp_path / 'run'}"], claim=True)
    assert message.startswith("experts=e99 is not an option")
    assert preflight(["--cfg", "job", "model.bogus=1"]).startswith("model.bogus is not a setting")
    assert preflight(["--cfg", "job", f"hydra.run.dir={tmp_path / 'run'}"], claim=True) is None
    assert not (tmp_path / "run").exists()


def test_trainer_deterministic_has_one_spelling_under_every_trainer(make_cfg):
    for trainer in ("auto", "cpu", "gpu", "ddp"):
        cfg = make_cfg(f"trainer={trainer}", "trainer.deterministic=true")
        assert cfg.trainer.deterministic is True, trainer
    message = preflight(["+trainer.deterministic=true"])
    assert "already at 'trainer.deterministic'" in message and "Drop the +" in message


def test_the_default_trainer_is_the_cpu_here_and_the_gpu_where_there_is_one(make_cfg, monkeypatch):
    from moe_lab.training import auto

    monkeypatch.setattr(auto, "cpu_bfloat16_isa", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "here" is a machine without a GPU
    cpu = validate(make_cfg(fast=False)).trainer
    assert (cpu["accelerator"], cpu["precision"], cpu["deterministic"]) == ("cpu", "32-true", True)
    assert {k: cpu[k] for k in ("accelerator", "precision", "deterministic", "devices")} == {
        k: validate(make_cfg("trainer=cpu", fast=False)).trainer[k]
        for k in ("accelerator", "precision", "deterministic", "devices")
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = auto.resolved_trainer({"accelerator": "auto", "precision": "auto", "deterministic": "auto"})
    assert gpu == {"accelerator": "gpu", "precision": "bf16-mixed", "deterministic": None}
    ddp = auto.resolved_trainer(dict(make_cfg("trainer=ddp", fast=False).trainer))
    assert (ddp["accelerator"], ddp["precision"]) == ("gpu", "bf16-mixed")


def test_a_cpu_with_amx_defaults_to_compiled_bf16_and_one_setting_gives_float32_back(make_cfg, monkeypatch):
    """The fast path (bf16-mixed + torch.compile) is the default where it was measured to pay; trainer.precision=
    32-true is the float32 eager run of before, and compile stays off wherever it is not asked for or not measured."""
    from moe_lab.training import auto

    monkeypatch.setattr(auto, "cpu_bfloat16_isa", lambda: "AMX")
    monkeypatch.setattr(auto, "can_build_cpu_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the default trainer picks a GPU where there is one
    fast = validate(make_cfg(fast=False))
    assert (fast.trainer["precision"], fast.trainer["deterministic"], fast.compile) == ("bf16-mixed", True, True)
    assert fast.optim.fused is True
    float32 = validate(make_cfg("trainer.precision=32-true", fast=False))
    assert (float32.trainer["precision"], float32.compile, float32.optim.fused) == ("32-true", False, False)
    assert validate(make_cfg("compile=false", fast=False)).compile is False
    assert validate(make_cfg("trainer=ddp", "trainer.accelerator=cpu", fast=False)).compile is False  # 2 processes
    monkeypatch.setattr(auto, "can_build_cpu_kernels", lambda: False)
    assert validate(make_cfg(fast=False)).compile is False  # no compiler: eager bf16, no error
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        validate(make_cfg("compile=true", fast=False))
    monkeypatch.setattr(auto, "cpu_bfloat16_isa", lambda: None)
    plain = validate(make_cfg(fast=False))
    assert (plain.trainer["precision"], plain.compile) == ("32-true", False)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "held_to", "expected"),
    [
        (True, True, None, "AMX"),
        (False, True, None, "AVX512-BF16"),  # AMD EPYC (Zen 4 and later)
        (False, False, None, None),  # AVX2 only
        (True, True, "AVX512_CORE_BF16", "AVX512-BF16"),  # an AMX CPU held to what an EPYC has
        (True, True, "avx512_core_amx", "AMX"),  # oneDNN's older name, any case
        (True, True, "AVX2", None),
        (False, True, "AVX512_CORE", None),
        (False, True, "ALL", "AVX512-BF16"),
        (False, True, "NOT_AN_ISA", "AVX512-BF16"),  # oneDNN ignores a name it does not know; so does auto
    ],
)
def test_auto_precision_picks_bfloat16_on_cpus_with_amx_or_avx512_bf16_as_onednn_may_use_them(
    monkeypatch, make_cfg, amx, avx512_bf16, held_to, expected
):
    from moe_lab.training import auto

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if held_to is not None:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", held_to)
    assert auto.cpu_bfloat16_isa() == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(auto, "can_build_cpu_kernels", lambda: True)
    cfg = make_cfg(fast=False)
    run = validate(cfg)
    assert run.trainer["precision"] == ("32-true" if expected is None else "bf16-mixed")
    assert run.compile is (expected is not None)
    said = auto.auto_choices(cfg.trainer, cfg.compile, run)[0]
    if expected is None and (amx or avx512_bf16):
        assert "ONEDNN_MAX_CPU_ISA holds oneDNN below them" in said, said
    else:
        assert said.startswith(
            "32-true, as this CPU has neither" if expected is None else f"bf16-mixed, as this CPU has {expected}"
        )


def test_preflight_refuses_a_used_run_directory(tmp_path):
    used = tmp_path / "run"
    (used / "checkpoints").mkdir(parents=True)
    message = preflight([f"hydra.run.dir={used}"])
    assert message is not None and "already holds a run" in message
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    message = preflight(["-m", "experts=e4,e8", f"hydra.sweep.dir={sweep}"])
    assert message is not None and "already holds runs" in message


@pytest.mark.parametrize("option", ["hash", "domain_oracle"])
def test_a_router_without_a_learned_gate_brings_its_aux_loss(make_cfg, option):
    """router=hash alone trains: its option brings aux_loss=none; a router loss asked for explicitly is refused."""
    run = validate(make_cfg(f"router={option}"))
    assert all(weight == 0 for weight in run.model.moe.aux_loss.weights().values())
    with pytest.raises(ConfigError, match="has no learned gate"):
        validate(make_cfg(f"router={option}", "aux_loss=switch"))


def test_tensorboard_without_its_package_is_refused_before_any_work(make_cfg, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger=tensorboard needs the tensorboard package: pip install"):
        validate(make_cfg("logger=tensorboard"))
    validate(make_cfg("logger=csv"))


def test_the_header_says_what_auto_chose_and_why(monkeypatch):
    from moe_lab.training import auto

    from conftest import compose_cfg

    for isa, precision, compiled, why in (
        (None, "32-true", "eager", "has neither AMX nor AVX512-BF16"),
        ("AMX", "bf16-mixed", "compiled", "has AMX"),
        ("AVX512-BF16", "bf16-mixed", "compiled", "has AVX512-BF16"),
    ):
        monkeypatch.setattr(auto, "cpu_bfloat16_isa", lambda isa=isa: isa)
        monkeypatch.setattr(auto, "can_build_cpu_kernels", lambda: True)
        cfg = compose_cfg(["trainer=auto", "trainer.accelerator=cpu"], output_dir=Path("/nonexistent"), fast=False)
        run = validate(cfg)
        said = auto.auto_choices(cfg.trainer, cfg.compile, run)
        assert said[0].startswith(f"{precision}, as this CPU {why}"), said
        assert said[1].startswith(f"{compiled}, as"), said
    fixed = ["trainer=auto", "trainer.accelerator=cpu", "trainer.precision=32-true", "compile=false"]
    cfg = compose_cfg(fixed, output_dir=Path("/nonexistent"))
    assert auto.auto_choices(cfg.trainer, cfg.compile, validate(cfg)) == []  # nothing was left to auto


def test_a_gate_less_router_brings_its_aux_loss_without_a_yaml(make_cfg):
    """hash and domain_oracle have no conf/router/NAME.yaml: their Configs say they bring aux_loss=none, which
    `router=NAME` composes; an aux_loss named on the command line still wins (and is refused for a gate-less
    router, in one line)."""
    from moe_lab.model.router_configs import registered_routers

    for name in ("hash", "domain_oracle"):
        assert not (Path(config_dir()) / "router" / f"{name}.yaml").exists()
        assert registered_routers()[name].brings_aux_loss == "none"
        weights = make_cfg(f"router={name}").model.moe.aux_loss
        assert all(float(weight) == 0 for weight in weights.values()), name
    with pytest.raises(ConfigError, match="has no learned gate"):
        validate(make_cfg("router=hash", "aux_loss=switch_z"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=deepseek_v3_tiny"],
        ["model=glm45_tiny"],
        ["model=gpt_oss_tiny", "model.n_layers=3"],
        ["model=qwen3_next_tiny", "model.n_layers=4"],
        ["model.mtp_depth=2"],
        ["model=deepseek_v3_tiny", "model.mtp_depth=1"],
        ["experts=e16_latent"],
        ["experts=e16_latent", "model.moe.expert_bias=true", "model.moe.num_shared=1"],
    ],
)
def test_every_architecture_option_is_counted_before_it_is_built(make_cfg, overrides):
    """The size a command checks before it builds a model (ModelConfig.size_estimate) is the model's parameter count:
    latent attention, sinks, biases, latent experts and multi-token prediction included."""
    run = validate(make_cfg(*overrides, "model.vocab_size=256"))
    model = MoETransformer(run.model)
    assert run.model.size_estimate()[0] == sum(p.numel() for p in model.parameters())


def test_the_moe_layers_may_be_any_list(make_cfg):
    """model.moe.layers lists the MoE layers for a pattern the short form (first_dense_layers, every_n_layers) cannot
    say; the model builds those layers as MoE and the others dense, and a bad list is one line."""
    run = validate(make_cfg("model.n_layers=4", "model.moe.layers=[0,1,3]", "model.vocab_size=256"))
    model = MoETransformer(run.model)
    assert model.moe_layers == [0, 1, 3] == run.model.moe_layers
    assert [block.is_moe for block in model.blocks] == [True, True, False, True]
    assert run.model.size_estimate()[0] == sum(p.numel() for p in model.parameters())
    for bad, says in (
        ("model.moe.layers=[0,4]", "distinct layers in 0..3"),
        ("model.moe.layers=[]", "no layer is MoE"),
    ):
        with pytest.raises(ConfigError, match=says):
            validate(make_cfg("model.n_layers=4", bad))
