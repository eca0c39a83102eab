"""Checkpoints out of moe-lab: export to Hugging Face transformers.

`moe-lab export CKPT --format hf OUT_DIR` writes a model `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`
loads, and its tokenizer. The architecture follows the attention, then the router and experts:
    Qwen3-MoE   q/k RMSNorm per head (model.qk_norm=head; imported Qwen3-MoE models);
    OLMoE       q/k RMSNorm over the projection (model.qk_norm=full; imported OLMoE models);
    Mixtral     softmax top-k with weights renormalised to sum to 1, every layer MoE, no shared expert, no biases;
    Qwen2-MoE   otherwise: weights not renormalised, dense layers (mlp_only_layers), a sigmoid-gated shared expert,
                q/k/v biases.
Both are dropless, as `moe_lab.load_model` is by default, so their logits equal moe-lab's. Which moe-lab routers a Hugging Face MoE block can express is
decided here (`hf_routing`), not by the routers.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from moe_lab.data.config import TokenizerConfig
from moe_lab.errors import ExportError
from moe_lab.model import ModelConfig, MoETransformer
from moe_lab.model.routers import ROUTERS, RouterConfig, router_config
from moe_lab.training.checkpoint import load_model

FORMATS = ("hf",)
HF_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


# ------------------------------------------------------------------------------------------------------------
# Which Hugging Face architecture


def hf_routing(router: RouterConfig, num_experts: int) -> Optional[dict]:
    """Eval-mode routing of a moe-lab router as Hugging Face's softmax top-k MoE block expresses it
    ({"top_k", "norm_topk_prob"}), or None when no Hugging Face MoE routes this way."""
    name = router.name
    if name == "topk":
        if router.score != "softmax" or router.num_groups > 1 or router.scaling_factor != 1.0:
            return None  # sigmoid, group-limited or scaled routing: DeepSeek-V3 in HF, whose attention is MLA
        return {"top_k": router.top_k, "norm_topk_prob": router.normalize}
    if name == "noisy_topk":  # evaluation: softmax over the top-k clean logits = the renormalised softmax top-k
        return {"top_k": router.top_k, "norm_topk_prob": True}
    if name == "switch":  # the top-1 probability, not renormalised
        return {"top_k": 1, "norm_topk_prob": False}
    if name == "sinkhorn":  # evaluation: softmax top-k
        return {"top_k": router.top_k, "norm_topk_prob": False}
    if name == "soft":  # all experts; the weights already sum to one
        return {"top_k": num_experts, "norm_topk_prob": True}
    return None  # expert choice, hash, aux-free bias, hierarchical gates: no Hugging Face block routes this way


def exportable_routers() -> list[str]:
    return sorted(n for n, cls in ROUTERS.items() if hf_routing(cls.Config(), 8) is not None)


def hf_architecture(cfg: ModelConfig) -> tuple[str, dict]:
    """("mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe", routing) for this model, or ExportError saying why none
    fits. The attention decides first (q/k norm per head: Qwen3-MoE; over the projection: OLMoE), then the MoE."""
    moe = cfg.moe
    if not moe.enabled:
        raise ExportError("a dense model (experts=dense) is not an MoE; export supports MoE models "
                          f"({', '.join(HF_ARCHITECTURES)})")
    router = router_config(moe.router)
    routing = hf_routing(router, moe.num_experts)
    if routing is None:
        raise ExportError(
            f"router={router.name} ({_describe(router)}) has no Hugging Face equivalent. Export writes Mixtral, "
            f"Qwen2-MoE, Qwen3-MoE or OLMoE, whose routing is softmax top-k: routers {exportable_routers()} (topk "
            "with score=softmax, one group and scaling_factor=1)")
    if moe.activation not in ("swiglu", "geglu"):
        raise ExportError(f"model.moe.activation={moe.activation}: Hugging Face MoE experts are gated "
                          "(swiglu or geglu)")
    if moe.num_shared and not moe.shared_gate:
        raise ExportError("shared experts without a gate (DeepSeekMoE) have no Hugging Face equivalent with this "
                          "attention; Qwen2-MoE gates its shared expert: train with model.moe.shared_gate=true")
    every_layer = len(cfg.moe_layers) == cfg.n_layers
    if cfg.qk_norm is not None:
        family = "qwen3_moe" if cfg.qk_norm == "head" else "olmoe"
        for present, what in ((moe.num_shared, "shared experts"), (cfg.qkv_bias, "q/k/v biases"),
                              (family == "olmoe" and not every_layer, "dense layers"),
                              (family == "olmoe" and cfg.head_size not in (None, cfg.d_model // cfg.n_heads),
                               "a head size other than d_model / n_heads")):
            if present:
                raise ExportError(f"model.qk_norm={cfg.qk_norm} is {family} attention, and {family} has no {what}")
        return family, routing
    if routing["norm_topk_prob"] and every_layer and not moe.num_shared and not cfg.qkv_bias:
        return "mixtral", routing
    return "qwen2_moe", routing


def _describe(router: RouterConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(router).items() if k != "name")


def hf_config(cfg: ModelConfig, architecture: str, routing: dict, eos_id: int):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    moe = cfg.moe
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  hidden_act="silu" if moe.activation == "swiglu" else "gelu_pytorch_tanh",
                  tie_word_embeddings=cfg.tie_embeddings, num_experts_per_tok=routing["top_k"],
                  eos_token_id=eos_id, bos_token_id=None, pad_token_id=None, initializer_range=cfg.init_std,
                  output_router_logits=False, torch_dtype="float32",
                  # The Switch load-balancing weight (HF's load_balancing_loss_func); HF has no z-loss.
                  router_aux_loss_coef=moe.aux_loss.load_balance)
    if architecture == "mixtral":
        return MixtralConfig(intermediate_size=moe.expert_hidden, num_local_experts=moe.num_experts,
                             sliding_window=None, **common)
    if architecture == "olmoe":
        return OlmoeConfig(intermediate_size=moe.expert_hidden, num_experts=moe.num_experts,
                           norm_topk_prob=routing["norm_topk_prob"], attention_bias=False, clip_qkv=None, **common)
    dense_layers = [layer for layer in range(cfg.n_layers) if not cfg.is_moe_layer(layer)]
    if architecture == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=cfg.ffn_hidden, moe_intermediate_size=moe.expert_hidden,
                              num_experts=moe.num_experts, norm_topk_prob=routing["norm_topk_prob"],
                              decoder_sparse_step=1, mlp_only_layers=dense_layers, attention_bias=False,
                              use_sliding_window=False, **common)
    return Qwen2MoeConfig(intermediate_size=cfg.ffn_hidden, moe_intermediate_size=moe.expert_hidden,
                          shared_expert_intermediate_size=moe.shared_width,
                          num_experts=moe.num_experts, norm_topk_prob=routing["norm_topk_prob"],
                          decoder_sparse_step=1, mlp_only_layers=dense_layers, qkv_bias=cfg.qkv_bias,
                          use_sliding_window=False, **common)


def hf_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """moe-lab's weights under Hugging Face's names (Mixtral and Qwen2-MoE share them where they overlap)."""
    cfg = model.cfg
    kv = cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        out[p + "self_attn.q_proj.weight"] = block.attn.q_proj.weight
        k, v = block.attn.kv_proj.weight.split([kv, kv], dim=0)  # kv_proj rows: (k | v) x heads x head dim
        out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = k, v
        if cfg.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = block.attn.q_proj.bias
            k, v = block.attn.kv_proj.bias.split([kv, kv], dim=0)
            out[p + "self_attn.k_proj.bias"], out[p + "self_attn.v_proj.bias"] = k, v
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = block.attn.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = block.attn.k_norm.weight
        out[p + "self_attn.o_proj.weight"] = block.attn.o_proj.weight
        ffn = block.ffn
        if block.is_moe:
            out[p + "mlp.gate.weight"] = ffn.router.gate_ED
            out[p + "mlp.experts.gate_up_proj"] = ffn.experts.w_in_EGFD  # (E, 2F, D): gate rows, then up rows
            out[p + "mlp.experts.down_proj"] = ffn.experts.w_out_EDF
            if ffn.shared is not None:
                _dense(out, p + "mlp.shared_expert.", ffn.shared)
                out[p + "mlp.shared_expert_gate.weight"] = ffn.shared_gate.weight
        else:
            _dense(out, p + "mlp.", ffn)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _dense(out: dict, prefix: str, ffn) -> None:
    gate, up = ffn.w_in.weight.chunk(2, dim=0)
    out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = gate, up
    out[prefix + "down_proj.weight"] = ffn.w_out.weight


def to_hf(model: MoETransformer, eos_id: int):
    """A transformers model (float32, eval mode) with moe-lab's weights."""
    from transformers import AutoModelForCausalLM

    architecture, routing = hf_architecture(model.cfg)
    config = hf_config(model.cfg, architecture, routing, eos_id)
    with warnings.catch_warnings():  # a width-0 shared expert warns that initialising it does nothing
        warnings.filterwarnings("ignore", message=".*zero-element tensors.*")
        hf = AutoModelForCausalLM.from_config(config)
    state = hf_state_dict(model)
    missing = {k: v for k, v in hf.state_dict().items() if k not in state}
    # Qwen2-MoE always builds a shared expert; a model without one exports it at width 0 (it adds nothing).
    for name, tensor in missing.items():
        if tensor.numel() and "shared_expert" not in name:
            raise ExportError(f"no moe-lab weight for {name}")
        state[name] = torch.zeros_like(tensor)
    hf.load_state_dict(state, strict=True)
    return hf.eval()


# ------------------------------------------------------------------------------------------------------------
# Tokenizers


def byte_tokenizer_json():
    """moe-lab's byte tokenizer as a `tokenizers.Tokenizer`: byte b is token b, <|endoftext|> is 256. ByteLevel
    pre-tokenisation maps each byte to a printable stand-in (GPT-2's reversible map); the vocabulary lists them in
    byte order, so token ids are the bytes themselves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def hf_tokenizer(tokenizer_cfg: dict[str, Any]):
    """A transformers fast tokenizer equal to the one the model was trained with."""
    from transformers import PreTrainedTokenizerFast

    from moe_lab.data.tokenizer import HFTokenizer

    name = (tokenizer_cfg or {}).get("name")
    if name is None:
        tok, eos = byte_tokenizer_json(), "<|endoftext|>"
    else:
        loaded = HFTokenizer(**dataclasses.asdict(TokenizerConfig(**tokenizer_cfg)))
        tok, eos = loaded._tok, loaded._tok.id_to_token(loaded.eos_id)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


# ------------------------------------------------------------------------------------------------------------
# The command


def export_hf(ckpt_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; export writes a directory: choose a new directory")
    if not out.parent.exists() or not out.parent.is_dir():
        raise ExportError(f"{out.parent} does not exist or is not a directory; create it or choose another path")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; moe-lab never writes over files: choose a new directory")
    module = load_model(ckpt_path)
    tokenizer = hf_tokenizer(module.hparams.get("tokenizer"))
    model = to_hf(module.model, eos_id=tokenizer.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"architecture": type(model).__name__, "out_dir": str(out)}
