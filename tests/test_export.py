"""Export to Hugging Face transformers: logits equal moe-lab's own, tokenizer round trip, clear refusals."""

from __future__ import annotations

import pytest
import torch

import moe_lab
from moe_lab.errors import ExportError, UserError
from moe_lab.tools.export import export_hf
from moe_lab.training.train import train

transformers = pytest.importorskip("transformers")

# Dropless, so that moe-lab's evaluation routes exactly as Hugging Face's dropless blocks.
COMMON = ["capacity=dropless", "trainer.max_steps=3", "trainer.val_check_interval=3", "model.n_layers=3"]


def trained(make_cfg, tmp_path, *overrides, name="run"):
    train(make_cfg(*COMMON, *overrides, name=name))
    return tmp_path / name / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "overrides,architecture",
    [
        ([], "MixtralForCausalLM"),  # softmax top-2, renormalised, every layer MoE
        (
            [
                "model.moe.router.normalize=false",
                "model.moe.num_shared=1",
                "model.moe.shared_gate=true",
                "model.moe.first_dense_layers=1",
                "model.n_kv_heads=1",
            ],
            "Qwen2MoeForCausalLM",
        ),
        (["router=switch"], "Qwen2MoeForCausalLM"),
        (["router=soft", "experts=e4"], "MixtralForCausalLM"),
        # latent attention, the aux-loss-free router's bias (trained 3 steps), groups, a shared expert, a dense layer
        (["model=deepseek_v3_tiny"], "DeepseekV3ForCausalLM"),
        (  # a sigmoid top-k without a bias, scaled; a full-rank query
            [
                "model=deepseek_v3_tiny",
                "router=topk",
                "model.moe.router.score=sigmoid",
                "model.moe.router.scaling_factor=2.5",
                "model.q_lora_rank=null",
            ],
            "DeepseekV3ForCausalLM",
        ),
        # q/k/v biases, per-head q/k norms, partial rotary, the aux-loss-free router, an ungated shared expert
        (["model=glm45_tiny"], "Glm4MoeForCausalLM"),
        (["router=topk", "model.moe.router.score=sigmoid"], "Glm4MoeForCausalLM"),  # sigmoid routing, plain attention
        # sinks, a window of 16 on layers 0 and 2 (sequences of 48), YaRN, biases everywhere, the clamped SwiGLU
        (["model=gpt_oss_tiny", "model.sliding_window=16"], "GptOssForCausalLM"),
        # Gated DeltaNet in layers 0 and 1, gated attention in layer 2, zero-centred norms, a gated shared expert
        (["model=qwen3_next_tiny", "model.linear_layers=[0,1]"], "Qwen3NextForCausalLM"),
    ],
)
def test_exported_logits_equal_moe_labs(make_cfg, tmp_path, overrides, architecture):
    ckpt = trained(make_cfg, tmp_path, *overrides)
    out = tmp_path / "hf"
    result = export_hf(ckpt, out)
    assert result["architecture"] == architecture
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = moe_lab.load_model(ckpt)
    ids = torch.randint(0, 257, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)


def test_load_model_for_notebooks(make_cfg, tmp_path):
    model = moe_lab.load_model(trained(make_cfg, tmp_path))
    assert not model.training
    ids = torch.randint(0, 257, (3, 17))
    assert model(ids).shape == (3, 17, 320)


def test_exported_tokenizer_is_the_byte_tokenizer(make_cfg, tmp_path):
    export_hf(trained(make_cfg, tmp_path), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "déf f(x):\n    return 2 * x  # ünïcode ✓"
    ids = tok(text).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.eos_token_id == 256


def test_routers_without_an_equivalent_are_refused_naming_the_formats(make_cfg, tmp_path):
    ckpt = trained(make_cfg, tmp_path, "router=hash", "aux_loss=none")
    with pytest.raises(
        ExportError,
        match=r"router=hash .* has no Hugging Face equivalent. Export writes Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
        r"DeepSeek-V3, GLM-4.5, gpt-oss or Qwen3-Next; their routings: softmax top-k .* in Mixtral, Qwen2-MoE, "
        r"Qwen3-MoE, OLMoE, Qwen3-Next: routers \['noisy_topk', .*\]; biased sigmoid top-k .* in DeepSeek-V3, "
        r"GLM-4.5: routers \['aux_free'\]; softmax over the top-k logits .* in gpt-oss: routers \[.*'topk'\]",
    ):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_never_writes_over_files(make_cfg, tmp_path):
    ckpt = trained(make_cfg, tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(ckpt, tmp_path / "hf")
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="no such checkpoint"):
        export_hf(tmp_path / "missing.ckpt", tmp_path / "other")


def test_load_model_is_dropless_and_causal_for_inference(make_cfg, tmp_path):
    """Trained with a capacity limit (the default cf1_25, eval 2.0): for inference, load_model routes every token, so
    a token's logits depend neither on later tokens nor on the other sequences of the batch, and equal the export's."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    train(make_cfg("trainer.max_steps=3", "trainer.val_check_interval=3", "model.n_layers=3", name="run"))
    model = moe_lab.load_model(ckpt)
    assert model.model_cfg.moe.eval_capacity_factor is None
    assert moe_lab.load_model(ckpt, capacity="checkpoint").model_cfg.moe.eval_capacity_factor == 2.0
    torch.manual_seed(0)
    prompt = torch.randint(0, 257, (1, 40))
    longer = torch.cat([prompt, torch.randint(0, 257, (1, 24))], dim=1)
    batch = torch.cat([prompt, torch.randint(0, 257, (7, 40))])
    with torch.no_grad():
        alone = model(prompt)
        torch.testing.assert_close(model(longer)[:, :40], alone, rtol=0, atol=1e-5)  # later tokens change nothing
        torch.testing.assert_close(model(batch)[:1], alone, rtol=0, atol=1e-5)  # neither do other sequences
        export_hf(ckpt, tmp_path / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(batch).logits, model(batch), rtol=0, atol=1e-4)
