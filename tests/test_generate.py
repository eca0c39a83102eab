"""`moe-lab generate`: a KV cache that changes nothing, sampling that means what it says, greedy output equal to
transformers' `generate` on the same model, and routing shown per token."""

from __future__ import annotations

import pytest
import torch

from moe_lab.errors import UserError
from moe_lab.model import ModelConfig, MoETransformer
from moe_lab.model.attention import KVCache
from moe_lab.tools.generate import Sampling, coloured_terminal, generate, next_tokens, token_pieces

from conftest import run_cli


def tiny_model(**extra) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        {
            "vocab_size": 96,
            "d_model": 64,
            "n_heads": 4,
            "n_kv_heads": 2,
            "n_layers": 3,
            "max_seq_len": 64,
            **extra,
            "moe": {"num_experts": 4, "expert_hidden": 32, "capacity_factor": None, "eval_capacity_factor": None},
        }
    )
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


LATENT = {"n_kv_heads": None, "kv_lora_rank": 16, "q_lora_rank": 24, "head_size": 24, "rope_dims": 8, "v_head_size": 12}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"qk_norm": "full", "qkv_bias": True},
        {"qk_norm": "head", "head_size": 24},
        {"rope_dims": 8},  # partial rotary
        LATENT,  # latent attention (DeepSeek-V3)
        {  # gpt-oss's attention: sinks, a window of 6 on layers 0 and 2, output biases, YaRN
            "attention_sinks": True,
            "sliding_window": 6,
            "sliding_layers": [0, 2],
            "qkv_bias": True,
            "out_bias": True,
            "rope_scaling_factor": 4.0,
            "rope_original_max_seq_len": 16,
        },
        {  # Qwen3-Next's hybrid: Gated DeltaNet in layers 0 and 2 (conv and recurrent state in the cache), gated
            # attention with zero-centred per-head q/k norms and a quarter of each head rotated
            "linear_layers": [0, 2],
            "attention_gate": True,
            "norm_offset": True,
            "qk_norm": "head",
            "rope_dims": 4,
        },
    ],
)
def test_cached_steps_and_left_padding_change_no_logit(extra):
    model = tiny_model(**extra)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cache = KVCache(model.cfg, 2, 24, ids.device, torch.float32)
    steps = [model(ids[:, :8], cache=cache).logits] + [
        model(ids[:, t : t + 1], cache=cache).logits for t in range(8, 20)
    ]
    # Gated DeltaNet carries a state through every step, in another order of float operations than the full forward's
    # chunks: its rounding (3e-6 of the largest logit here, the same with the recurrence everywhere) needs more room.
    atol = 5e-5 if extra.get("linear_layers") else 1e-5
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=atol)
    # Row 1 is 5 tokens shorter and left-padded: its logits are those of its own tokens alone.
    padded = torch.cat([ids[:1], torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[1:, :15]], 1)])
    valid = torch.ones_like(padded, dtype=torch.bool)
    valid[1, :5] = False
    out = model(padded, cache=KVCache(model.cfg, 2, 24, ids.device, torch.float32), valid_BS=valid).logits
    torch.testing.assert_close(out[1, 5:], model(ids[1:, :15]).logits[0], rtol=0, atol=atol)
    torch.testing.assert_close(out[0], full[0], rtol=0, atol=atol)


def test_greedy_generation_is_the_argmax_of_full_forwards():
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    results = generate(model, prompts, 12, Sampling(), show_layer=1)
    for prompt, result in zip(prompts, results):
        ids = list(prompt)
        for _ in range(12):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert result.new_ids == ids[len(prompt) :]
        # The routing shown is that of a full forward over the whole text.
        with torch.no_grad():
            out = model(torch.tensor([ids]))
        assert result.experts == out.moe[1].top_expert_T(len(ids)).tolist()


def test_sampling_controls():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -5.0]])
    gen = torch.Generator().manual_seed(0)
    assert next_tokens(logits, Sampling(), gen).item() == 0
    assert {next_tokens(logits, Sampling(temperature=5.0, top_k=1), gen).item() for _ in range(50)} == {0}
    assert {next_tokens(logits, Sampling(temperature=5.0, top_k=2), gen).item() for _ in range(200)} == {0, 1}
    # p(0) = 0.66, p(1) = 0.24: top_p 0.5 keeps only token 0, 0.8 keeps tokens 0 and 1.
    assert {next_tokens(logits, Sampling(temperature=1.0, top_p=0.5), gen).item() for _ in range(100)} == {0}
    assert {next_tokens(logits, Sampling(temperature=1.0, top_p=0.8), gen).item() for _ in range(300)} == {0, 1}
    model = tiny_model()
    a = generate(model, [[3, 4, 5]], 10, Sampling(temperature=1.0, seed=7))
    b = generate(model, [[3, 4, 5]], 10, Sampling(temperature=1.0, seed=7))
    c = generate(model, [[3, 4, 5]], 10, Sampling(temperature=1.0, seed=8))
    assert a[0].new_ids == b[0].new_ids != c[0].new_ids  # seeded
    with pytest.raises(UserError, match="top-p"):
        Sampling(top_p=0).check()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_greedy_output_equals_transformers_generate(family, tmp_path):
    from test_import import save_hf_model

    from moe_lab.interop.huggingface import build_model

    hf = save_hf_model(family, tmp_path / "hf")
    model = build_model(hf)
    prompts = [[10, 11, 12, 13, 14, 15], [40, 41, 42]]
    ours = generate(model, prompts, 16, Sampling())
    # transformers, batched the same way: left padding and an attention mask.
    ids = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    theirs = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    for i, result in enumerate(ours):
        assert result.new_ids == theirs[i, 6:].tolist(), i


def test_token_pieces_join_to_the_text():
    from moe_lab.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ids = tok.encode_prompt("naïve €5")
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == "naïve €5" and len(pieces) == len(ids)
    assert coloured_terminal(["de", "f", " x"], [2, 2, 0], colour=False) == "[E2:def][E0: x]"


@pytest.mark.slow
def test_generate_command(tmp_path):
    from test_import import save_hf_model

    save_hf_model("olmoe", tmp_path / "hf")
    result = run_cli(
        [
            "generate",
            str(tmp_path / "hf"),
            "--prompt",
            "def ",
            "--prompt",
            "x = ",
            "--max-new-tokens",
            "5",
            "--show-experts",
            "1",
            "--html",
            str(tmp_path / "experts.html"),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("[0] def ") and "\n[1] x = " in result.stdout
    assert "[E" in result.stdout  # the routing, in text when not on a terminal
    page = (tmp_path / "experts.html").read_text()
    assert page.count('title="expert') == 2 * 4 + 2 * 5 and "layer 1" in page  # 4 prompt bytes, 5 new
    bad = run_cli(["generate", str(tmp_path / "hf"), "--prompt", "a", "--show-experts", "7"], cwd=tmp_path)
    assert bad.returncode == 2 and "is not an MoE layer; the MoE layers are [0, 1, 2]" in bad.stderr
    none = run_cli(["generate", str(tmp_path / "hf")], cwd=tmp_path)
    assert none.returncode == 2 and "no prompt" in none.stderr
