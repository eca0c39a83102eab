"""`moe-lab import`: Hugging Face MoE models into moe-lab, exactly or not at all.

The models are tiny random ones built offline with transformers' own config classes and saved with save_pretrained,
so the import reads them the way it reads a downloaded one (`from_pretrained` on a directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_lab.errors import UserError
from moe_lab.interop.families import supported
from moe_lab.training.checkpoint import load_model

from conftest import REPO, run_cli

transformers = pytest.importorskip("transformers")

VOCAB = 320  # the byte tokenizer's 257 tokens fit
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    eos_token_id=256,
    bos_token_id=None,
    pad_token_id=None,
)


def _tiny_configs() -> dict:
    """A tiny random config of every MoE family moe-lab reads, by model_type (a new family adds its own here)."""
    from transformers import (
        DeepseekV3Config,
        Glm4MoeConfig,
        GptOssConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
        Qwen3NextConfig,
    )

    return {
        "mixtral": lambda **extra: MixtralConfig(
            intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **COMMON, **extra
        ),
        # a dense first layer, a wider shared expert, q/k/v biases, unnormalised weights
        "qwen2_moe": lambda **extra: Qwen2MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            **{"mlp_only_layers": [0], **COMMON, **extra},
        ),
        # an explicit head_dim unlike hidden_size / heads, per-head q/k norms
        "qwen3_moe": lambda **extra: Qwen3MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            norm_topk_prob=True,
            **COMMON,
            **extra,
        ),
        "olmoe": lambda **extra: OlmoeConfig(
            intermediate_size=16, num_experts=4, num_experts_per_tok=2, **COMMON, **extra
        ),
        # latent attention (a query latent, values narrower than keys, interleaved rope pairs), a biased sigmoid
        # router limited to 2 of 4 groups and scaled, an ungated shared expert, a dense first layer
        "deepseek_v3": lambda **extra: DeepseekV3Config(
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=12,
            **{**COMMON, "num_key_value_heads": 4, **extra},
        ),
        # DeepSeek-V3's router and experts behind grouped-query attention with q/k/v biases, per-head q/k norms and
        # RoPE on half of each head (its default partial_rotary_factor)
        "glm4_moe": lambda **extra: Glm4MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            first_k_dense_replace=1,
            attention_bias=True,
            use_qk_norm=True,
            head_dim=16,
            **COMMON,
            **extra,
        ),
        # a gate bias, expert biases and the clamped SwiGLU, attention biases and sinks, a window of 8 on alternate
        # layers (sequences of 40 pass it), YaRN (its default: factor 32 over 4096 positions)
        "gpt_oss": lambda **extra: GptOssConfig(
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=8,
            **{**COMMON, "max_position_embeddings": 131072, **extra},
        ),
        # Gated DeltaNet in layers 0 and 2 (2 key heads, 4 value heads), gated attention with per-head q/k norms and
        # RoPE on a quarter of each head in layer 1, zero-centred norms, a gated shared expert, 8 experts, top-2
        "qwen3_next": lambda **extra: Qwen3NextConfig(
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_num_value_heads=4,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            **COMMON,
            **extra,
        ),
    }


FAMILIES = [f.model_type for f in supported()]


def hf_config(family: str, **extra):
    return _tiny_configs()[family](**extra)


def test_every_family_has_a_tiny_model_here():
    assert sorted(_tiny_configs()) == sorted(FAMILIES)


def save_hf_model(family: str, path: Path, **extra):
    """A random transformers model of `family` (norms and biases off their init too) and moe-lab's byte tokenizer,
    saved as a downloaded model would be."""
    from transformers import AutoModelForCausalLM

    from moe_lab.tools.export import hf_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(family, **extra)).eval()
    with torch.no_grad():  # every weight, and the saved buffers (a sigmoid router's bias)
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.3)
    model.save_pretrained(path)
    hf_tokenizer({}).save_pretrained(path)
    return model


# Every family as its tiny config makes it, and a pattern of MoE layers that only an explicit list says (Qwen3-MoE,
# 3 layers, the last dense: MoE layers [0, 1]).
PARITY_CASES = [(family, {}) for family in FAMILIES] + [("qwen3_moe", {"mlp_only_layers": [2]})]


@pytest.mark.parametrize("family, extra", PARITY_CASES)
def test_imported_logits_equal_transformers(family, extra, tmp_path):
    from moe_lab.tools.export import export_hf
    from moe_lab.tools.hf_import import import_hf

    hf = save_hf_model(family, tmp_path / "hf", **extra)
    result = import_hf(str(tmp_path / "hf"), tmp_path / "imported")
    assert result["family"] == family
    module = load_model(result["checkpoint"])
    if "mlp_only_layers" in extra:
        assert module.model_cfg.moe.layers == [0, 1] and module.moe_layers == [0, 1]
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = module(ids), hf(ids).logits
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    # float32 rounding, nothing more; Gated DeltaNet's chunkwise recurrence rounds differently from transformers'
    # (1.5e-5 here; 3.6e-6 step by step): within the 1e-4 the families are held to.
    assert error < (5e-5 if family == "qwen3_next" else 1e-5), (family, error)
    assert (tmp_path / "imported" / "tokenizer" / "tokenizer.json").is_file()

    # import -> export -> import is the identity: same settings, same weights bit for bit.
    export_hf(result["checkpoint"], tmp_path / "exported")
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["model_type"] == family
    again = import_hf(str(tmp_path / "exported"), tmp_path / "again")
    first = torch.load(result["checkpoint"], weights_only=True)
    second = torch.load(again["checkpoint"], weights_only=True)
    assert first["hyper_parameters"]["model"] == second["hyper_parameters"]["model"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), name


@pytest.mark.parametrize(
    "family, extra, part",
    [
        ("mixtral", {"sliding_window": 64}, "sliding-window attention"),
        ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 64}, "sliding-window attention"),
        ("olmoe", {"clip_qkv": 8.0}, "clipping of q, k and v"),
        ("qwen3_moe", {"attention_bias": True}, "attention_bias=true"),
        ("mixtral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "scaled RoPE"),
        ("qwen2_moe", {"mlp_only_layers": [0, 1, 2]}, "no MoE layer"),
        ("mixtral", {"hidden_act": "relu"}, "hidden_act=relu"),
        ("gpt_oss", {"swiglu_limit": 5.0}, "swiglu_limit=5.0"),
        (
            "qwen3_moe",
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "rope_theta": 1e4,
                    "mscale": 0.7,
                }
            },
            "YaRN with its own attention scaling (mscale)",
        ),
    ],
)
def test_a_part_moe_lab_cannot_represent_is_refused(family, extra, part, tmp_path):
    from moe_lab.tools.hf_import import import_hf

    save_hf_model(family, tmp_path / "hf", **extra)
    with pytest.raises(UserError, match="has no moe-lab equivalent") as caught:
        import_hf(str(tmp_path / "hf"), tmp_path / "out")
    message = str(caught.value)
    assert part in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_quantised_gpt_oss_experts_are_refused_before_any_weight_is_read(tmp_path):
    """OpenAI's released gpt-oss weights are MXFP4-packed: refused in one line saying how to get float weights."""
    from moe_lab.tools.hf_import import import_hf

    config = hf_config("gpt_oss")
    config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    config.save_pretrained(tmp_path / "hf")  # a config alone: the refusal comes before any weight is looked for
    with pytest.raises(UserError, match=r"quantised experts \(quantization_config: mxfp4; .*Mxfp4Config") as caught:
        import_hf(str(tmp_path / "hf"), tmp_path / "out")
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_other_architectures_are_named(tmp_path):
    from transformers import DeepseekV2Config, LlamaConfig

    from moe_lab.tools.hf_import import import_hf

    for config, expected in (
        (
            DeepseekV2Config(
                **COMMON, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48
            ),
            "deepseek_v2 is not supported yet",
        ),
        (LlamaConfig(**COMMON, intermediate_size=48), "model_type='llama' cannot be imported"),
    ):
        folder = tmp_path / config.model_type
        config.save_pretrained(folder)
        with pytest.raises(UserError, match=expected):
            import_hf(str(folder), tmp_path / "out")
    with pytest.raises(UserError, match="could not read the config of"):
        import_hf(str(tmp_path / "missing"), tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="never writes over files"):
        import_hf(str(tmp_path / "mixtral"), tmp_path / "full")


@pytest.mark.slow
def test_fine_tuning_an_imported_model_starts_from_its_weights(tmp_path, cache_dir):
    """`moe-lab train ckpt_path=IMPORTED` with no model settings: the checkpoint brings the model and tokenizer; the
    run starts at step 0 from the imported weights with a fresh optimizer."""
    save_hf_model("qwen3_moe", tmp_path / "hf")
    imported = run_cli(["import", str(tmp_path / "hf"), str(tmp_path / "imported")], cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert "imported qwen3_moe" in imported.stdout
    ckpt = tmp_path / "imported" / "model.ckpt"
    data = [
        "data.seq_len=64",
        "data.batch_size=4",
        "++data.max_chars_per_domain=20000",
        "data.max_val_blocks=4",
        f"paths.cache_dir={cache_dir}",
    ]
    run = tmp_path / "tuned"
    result = run_cli(
        [
            "train",
            f"ckpt_path={ckpt}",
            *data,
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            "optim.warmup_steps=0",
            "optim.lr=1e-4",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuning" in result.stderr and "run finished at step 1" in result.stdout
    start = torch.load(ckpt, weights_only=True)["state_dict"]
    tuned = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    moved = max(float((tuned[k] - v).abs().max()) for k, v in start.items())
    assert 0 < moved < 1e-3  # one small step away from the imported weights, not a fresh init (std 0.02)
    # A moved import finds its own tokenizer.
    from moe_lab.training.checkpoint import checkpoint_origin

    (tmp_path / "imported").rename(tmp_path / "moved")
    origin = checkpoint_origin(tmp_path / "moved" / "model.ckpt")
    assert f"tokenizer.name='{tmp_path / 'moved' / 'tokenizer'}'" in origin.overrides
    assert origin.imported == str(tmp_path / "hf")
    (tmp_path / "moved").rename(tmp_path / "imported")
    # A model setting given on top is refused: fine-tuning keeps the imported model.
    refused = run_cli(
        ["train", f"ckpt_path={ckpt}", *data, "model.n_layers=2", f"hydra.run.dir={tmp_path / 'x'}"], cwd=tmp_path
    )
    assert refused.returncode == 2 and "model.n_layers is 3 in the checkpoint but 2 here" in refused.stderr


def test_import_help_names_the_families(tmp_path):
    result = run_cli(["import", "--help"], cwd=REPO)
    assert result.returncode == 0 and "Qwen3-MoE" in result.stdout and "OLMoE" in result.stdout


def test_a_hub_id_without_network_is_one_line_at_once(tmp_path, monkeypatch, capsys):
    """A hub id on a machine that cannot reach the hub (here: an endpoint on a closed local port): one line that says
    so and what to do, before huggingface_hub's retries; a copy in this machine's cache is named, not waited for."""
    from moe_lab.cli.main import main

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for args, what in (
        (["import", "someorg/some-moe", str(tmp_path / "out")], "the model someorg/some-moe"),
        (["train", "tokenizer.name=someorg/tok", f"hydra.run.dir={tmp_path / 'run'}"], "the tokenizer someorg/tok"),
        (["train", "data=hf", "data.name=someorg/corpus", f"hydra.run.dir={tmp_path / 'run'}"], "the dataset"),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower() or "Retry" in line]
        assert len(errors) == 1, err
        assert (
            errors[0].startswith("moe-lab: error: cannot reach the Hugging Face hub (127.0.0.1") and what in errors[0]
        )
        assert "--local-dir DIR" in errors[0]
        assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()
    # The same model, downloaded before into this machine's cache: the line says to use it (HF_HUB_OFFLINE=1).
    snapshot = tmp_path / "hub-cache" / "models--someorg--some-moe" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_HUB_OFFLINE": ""}
    result = run_cli(["import", "someorg/some-moe", str(tmp_path / "out")], tmp_path, env_extra=env, timeout=120)
    assert result.returncode == 2 and "HF_HUB_OFFLINE=1" in result.stderr and "cache holds a copy" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "gpt_oss", "qwen3_next"])
def test_an_imported_model_of_the_2025_families_works_like_any_checkpoint(family, tmp_path, cache_dir, capsys):
    """Generate (with its routing shown), evaluate, analyse and fine-tune an imported model of each 2025 family."""
    from moe_lab.cli.main import main

    save_hf_model(family, tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    ckpt = str(tmp_path / "imported" / "model.ckpt")
    data = [
        "data.seq_len=32",
        "++data.max_chars_per_domain=10000",
        "data.max_val_blocks=4",
        f"paths.cache_dir={cache_dir}",
    ]
    html = tmp_path / "experts.html"
    shown = ["--show-experts", "2", "--html", str(html)]
    assert main(["generate", ckpt, "--prompt", "def ", "--max-new-tokens", "4", *shown]) == 0
    assert html.is_file()
    assert main(["eval", ckpt, *data, "data.batch_size=2", "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["overall"]["loss"] > 0
    assert main(["analyze", ckpt, *data, "-o", str(tmp_path / "analysis.html")]) == 0
    assert json.loads((tmp_path / "analysis.json").read_text())
    run = tmp_path / "tuned"
    tune = ["trainer.max_steps=1", "trainer.val_check_interval=1", "optim.warmup_steps=0", f"hydra.run.dir={run}"]
    assert main(["train", f"ckpt_path={ckpt}", *data, "data.batch_size=2", *tune]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    capsys.readouterr()


def test_deepseek_v3_multi_token_prediction_weights_import_with_parity_and_export_back(tmp_path):
    """A DeepSeek-V3 checkpoint keeps its multi-token prediction module as layer n_layers (enorm, hnorm, eh_proj,
    shared_head, a decoder layer), which transformers' model drops. moe-lab reads it (model.mtp_depth=1), predicts
    token i + 2 as the module defines it, with transformers' own decoder layer as the reference block, and writes it
    back beside the exported model, bit for bit."""
    from safetensors.torch import load_file, save_file
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    from moe_lab.tools.export import MTP_FILE, export_hf
    from moe_lab.tools.hf_import import import_hf

    hf = save_hf_model("deepseek_v3", tmp_path / "hf")
    config, n = hf.config, hf.config.num_hidden_layers
    torch.manual_seed(3)
    layer = DeepseekV3DecoderLayer(config, layer_idx=n).eval()  # MoE: n >= first_k_dense_replace
    enorm, hnorm, head_norm = (DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps) for _ in range(3))
    eh_proj = torch.nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
    with torch.no_grad():
        for module in (layer, enorm, hnorm, head_norm, eh_proj):
            for tensor in module.state_dict().values():
                tensor.normal_(0.0, 0.3)
    p = f"model.layers.{n}."
    extra = {p + k: v for k, v in layer.state_dict().items()}
    extra |= {p + "enorm.weight": enorm.weight, p + "hnorm.weight": hnorm.weight, p + "eh_proj.weight": eh_proj.weight}
    extra |= {p + "shared_head.norm.weight": head_norm.weight, p + "shared_head.head.weight": hf.lm_head.weight}
    extra[p + "embed_tokens.weight"] = hf.model.embed_tokens.weight
    save_file({k: v.detach().contiguous().clone() for k, v in extra.items()}, str(tmp_path / "hf" / "mtp.safetensors"))

    result = import_hf(str(tmp_path / "hf"), tmp_path / "imported")
    module = load_model(result["checkpoint"])
    assert module.model_cfg.mtp_depth == 1
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    captured = {}
    handle = module.model.mtp[0].norm.register_forward_hook(lambda m, a, out: captured.update(h=out))
    with torch.no_grad():
        module.model(ids[:, :-1], ids[:, 1:])
        ours = module.model.lm_head(captured["h"])  # position i predicts token i + 2
        h = hf.model.embed_tokens(ids[:, :-1])  # the last layer's output, before the final norm
        positions = torch.arange(ids.shape[1] - 1)[None]
        rope = hf.model.rotary_emb(h, positions)
        for block in hf.model.layers:
            h = block(h, position_embeddings=rope, attention_mask=None, position_ids=positions)
        S = ids.shape[1] - 2
        x = eh_proj(torch.cat([enorm(hf.model.embed_tokens(ids[:, 1:-1])), hnorm(h[:, :S])], dim=-1))
        y = layer(x, position_embeddings=hf.model.rotary_emb(x, positions[:, :S]), attention_mask=None)
        theirs = hf.lm_head(head_norm(y))
    handle.remove()
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error < 1e-5, error

    export_hf(result["checkpoint"], tmp_path / "exported")
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    written = load_file(str(tmp_path / "exported" / MTP_FILE))
    assert written.keys() == extra.keys()
    for name, tensor in extra.items():
        assert torch.equal(written[name], tensor.detach()), name
    again = import_hf(str(tmp_path / "exported"), tmp_path / "again")
    first = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
    second = torch.load(again["checkpoint"], weights_only=True)["state_dict"]
    assert first.keys() == second.keys() and all(torch.equal(v, second[k]) for k, v in first.items())
