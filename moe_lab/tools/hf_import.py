"""Checkpoints into moe-lab: import a Hugging Face transformers MoE model.

`moe-lab import HF_DIR_OR_HUB_ID OUT_DIR` writes `OUT_DIR/model.ckpt` (the model's settings and weights, as a moe-lab
checkpoint) and `OUT_DIR/tokenizer/`. The checkpoint loads with `moe_lab.load_model`, generates (`moe-lab generate`),
evaluates (`moe-lab eval`) and fine-tunes (`moe-lab train ckpt_path=OUT_DIR/model.ckpt`: a new run from those
weights, with a fresh optimizer).

Families, and what each needs of the model (`moe_lab/model/config.py`):
    Mixtral     softmax top-k, weights renormalised; grouped-query attention
    Qwen2-MoE   softmax top-k (norm_topk_prob), a sigmoid-gated shared expert of its own width, q/k/v biases,
                dense layers (mlp_only_layers, decoder_sparse_step)
    Qwen3-MoE   softmax top-k, per-head q/k RMSNorm, an explicit head_dim, dense layers
    OLMoE       softmax top-k, q/k RMSNorm over the whole projection
A setting moe-lab cannot represent (sliding-window attention, scaled RoPE, qkv clipping, an output-projection bias,
DeepSeek's multi-head latent attention, a dense-layer pattern the model's settings cannot express) is refused with one
line naming it, before any weight is read: a model is never loaded approximately. Weights are read through
transformers' own `from_pretrained` (local directory or hub id), which also undoes each family's on-disk layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from moe_lab.errors import ModelImportError, UserError
from moe_lab.model import ModelConfig, MoETransformer

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
DENSE_FAMILIES = ("llama", "qwen2", "qwen3")  # read for upcycling (model.init_from)
CHECKPOINT = "model.ckpt"


# ------------------------------------------------------------------------------------------------------------
# Settings


def model_config(hf: Any, dense: bool = False) -> ModelConfig:
    """The moe-lab settings of a transformers config, or ModelImportError naming the part that has no equivalent.
    With `dense`, the dense families (Llama, Qwen2, Qwen3) instead of the MoE ones."""
    family = getattr(hf, "model_type", None)
    if dense:
        if family not in DENSE_FAMILIES:
            raise ModelImportError(f"model_type={family!r} is not a dense model moe-lab upcycles; the families are "
                                   f"{', '.join(DENSE_FAMILIES)} (or a moe-lab checkpoint of an experts=dense run)")
        return _dense_config(hf, family)
    if family in ("deepseek_v3", "deepseek_v2"):
        raise ModelImportError(f"{family} is not supported yet: moe-lab has no multi-head latent attention "
                               "(q_lora_rank, kv_lora_rank); its sigmoid group-limited router, shared experts and "
                               "first dense layers are supported (router=topk score=sigmoid num_groups=...)")
    if family not in FAMILIES:
        raise ModelImportError(f"model_type={family!r} cannot be imported; the families moe-lab imports are "
                               f"{', '.join(FAMILIES)}")

    def refuse(condition: bool, part: str) -> None:
        if condition:
            raise ModelImportError(f"{family}: {part} has no moe-lab equivalent; the model was not imported")

    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    refuse(rope_type not in (None, "default"), f"scaled RoPE (rope_type={rope_type})")
    theta = rope.get("rope_theta") if isinstance(rope, dict) and rope.get("rope_theta") else get("rope_theta", 1e4)
    refuse(family == "mixtral" and get("sliding_window") is not None,
           f"sliding-window attention (sliding_window={get('sliding_window')})")
    refuse(bool(get("use_sliding_window", False)), "sliding-window attention (use_sliding_window=true)")
    refuse(get("clip_qkv") is not None, f"clipping of q, k and v (clip_qkv={get('clip_qkv')})")
    refuse(bool(get("attention_bias", False)), "attention_bias=true (a bias on the output projection)")
    activation = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu"}.get(get("hidden_act"))
    refuse(activation is None, f"hidden_act={get('hidden_act')} (moe-lab's gated experts use silu or tanh-gelu)")

    n_layers, d_model, n_heads = get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or d_model // n_heads
    num_experts = get("num_local_experts") or get("num_experts")
    expert_hidden = get("moe_intermediate_size") if family.startswith("qwen") else get("intermediate_size")
    sparse_step = get("decoder_sparse_step", 1) or 1
    dense_only = set(get("mlp_only_layers", None) or [])
    moe_layers = [layer for layer in range(n_layers)
                  if layer not in dense_only and (layer + 1) % sparse_step == 0]
    first_dense, every = _layer_pattern(moe_layers, n_layers)
    refuse(first_dense is None, f"MoE layers {moe_layers} of {n_layers} (mlp_only_layers={sorted(dense_only)}, "
                                f"decoder_sparse_step={sparse_step}): moe-lab places them as first_dense_layers "
                                "then every_n_layers")
    shared = (get("shared_expert_intermediate_size", 0) or 0) if family == "qwen2_moe" else 0
    cfg = ModelConfig.from_dict({
        "name": family, "vocab_size": get("vocab_size"), "d_model": d_model, "n_layers": n_layers,
        "n_heads": n_heads, "n_kv_heads": get("num_key_value_heads") or n_heads,
        "head_size": head_dim if head_dim * n_heads != d_model else None,
        "qkv_bias": bool(get("qkv_bias", True)) if family == "qwen2_moe" else False,
        "qk_norm": {"qwen3_moe": "head", "olmoe": "full"}.get(family),
        "ffn_hidden": get("intermediate_size"), "max_seq_len": get("max_position_embeddings"),
        "rope_theta": float(theta), "norm_eps": get("rms_norm_eps"), "init_std": get("initializer_range", 0.02),
        "tie_embeddings": bool(get("tie_word_embeddings", False)),
        "moe": {
            "num_experts": num_experts, "expert_hidden": expert_hidden, "activation": activation,
            "num_shared": 1 if shared else 0, "shared_hidden": shared or None, "shared_gate": bool(shared),
            # Published MoEs route every token (no capacity): import them dropless in training and evaluation.
            "capacity_factor": None, "eval_capacity_factor": None,
            "first_dense_layers": first_dense, "every_n_layers": every,
            "router": {"name": "topk", "top_k": get("num_experts_per_tok"), "score": "softmax",
                       "normalize": True if family == "mixtral" else bool(get("norm_topk_prob", False))},
            "aux_loss": {"load_balance": float(get("router_aux_loss_coef", 0.0) or 0.0), "z_loss": 0.0},
        },
    })
    if family == "olmoe" and cfg.head_dim * n_heads != d_model:
        refuse(True, "a head_dim other than hidden_size / num_attention_heads (OLMoE's q/k norms span hidden_size)")
    try:
        cfg.check()
    except ValueError as e:
        raise ModelImportError(f"{family}: {e}") from None
    return cfg


def _dense_config(hf: Any, family: str) -> ModelConfig:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    for bad, part in ((rope_type not in (None, "default"), f"scaled RoPE (rope_type={rope_type})"),
                      (bool(get("use_sliding_window", False)), "sliding-window attention"),
                      (family != "qwen2" and bool(get("attention_bias", False)), "attention biases"),
                      (bool(get("mlp_bias", False)), "FFN biases"),
                      (get("hidden_act") != "silu", f"hidden_act={get('hidden_act')}")):
        if bad:
            raise ModelImportError(f"{family}: {part} has no moe-lab equivalent; the model was not read")
    theta = rope.get("rope_theta") if isinstance(rope, dict) and rope.get("rope_theta") else get("rope_theta", 1e4)
    d_model, n_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or d_model // n_heads
    cfg = ModelConfig.from_dict({
        "name": family, "vocab_size": get("vocab_size"), "d_model": d_model, "n_layers": get("num_hidden_layers"),
        "n_heads": n_heads, "n_kv_heads": get("num_key_value_heads") or n_heads,
        "head_size": head_dim if head_dim * n_heads != d_model else None, "qkv_bias": family == "qwen2",
        "qk_norm": "head" if family == "qwen3" else None, "ffn_hidden": get("intermediate_size"),
        "max_seq_len": get("max_position_embeddings"), "rope_theta": float(theta), "norm_eps": get("rms_norm_eps"),
        "init_std": get("initializer_range", 0.02), "tie_embeddings": bool(get("tie_word_embeddings", False)),
        "moe": {"enabled": False},
    })
    try:
        cfg.check()
    except ValueError as e:
        raise ModelImportError(f"{family}: {e}") from None
    return cfg


def _layer_pattern(moe_layers: list[int], n_layers: int) -> tuple[Optional[int], int]:
    """(first_dense_layers, every_n_layers) that give exactly these MoE layers, or (None, 1)."""
    if not moe_layers:
        return None, 1
    first = moe_layers[0]
    gaps = {b - a for a, b in zip(moe_layers, moe_layers[1:])}
    every = gaps.pop() if len(gaps) == 1 else (max(n_layers - first, 1) if not gaps else 0)
    if every and list(range(first, n_layers, every)) == moe_layers:
        return first, every
    return None, 1


def model_overrides(cfg: ModelConfig, tokenizer: Optional[dict] = None) -> list[str]:
    """The command-line overrides that compose exactly this model (and tokenizer): what an imported checkpoint
    carries, so that `moe-lab train ckpt_path=...` needs no retyping."""
    from omegaconf import OmegaConf

    def literal(value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

    out = [f"router={cfg.moe.router.name}"]
    flat = OmegaConf.to_container(OmegaConf.create({"model": dataclasses.asdict(cfg)}))

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}={literal(value)}")

    walk(flat, "")
    for key, value in (tokenizer or {}).items():
        out.append(f"tokenizer.{key}={literal(value)}")
    return out


# ------------------------------------------------------------------------------------------------------------
# Weights


def state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A transformers MoE state dict (the fused-experts layout `from_pretrained` gives) under moe-lab's names."""
    taken: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise ModelImportError(f"the model has no weight {name}; it does not match its config")
        taken.add(name)
        return hf_state[name].float()

    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    if cfg.tie_embeddings:
        taken.add("lm_head.weight")
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        out[q + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        out[q + "attn.q_proj.weight"] = take(p + "self_attn.q_proj.weight")
        out[q + "attn.kv_proj.weight"] = torch.cat([take(p + "self_attn.k_proj.weight"),
                                                    take(p + "self_attn.v_proj.weight")])
        if cfg.qkv_bias:
            out[q + "attn.q_proj.bias"] = take(p + "self_attn.q_proj.bias")
            out[q + "attn.kv_proj.bias"] = torch.cat([take(p + "self_attn.k_proj.bias"),
                                                      take(p + "self_attn.v_proj.bias")])
        out[q + "attn.o_proj.weight"] = take(p + "self_attn.o_proj.weight")
        if cfg.qk_norm:
            out[q + "attn.q_norm.weight"] = take(p + "self_attn.q_norm.weight")
            out[q + "attn.k_norm.weight"] = take(p + "self_attn.k_norm.weight")
        if cfg.is_moe_layer(i):
            out[q + "ffn.router.gate_ED"] = take(p + "mlp.gate.weight")
            out[q + "ffn.experts.w_in_EGFD"] = take(p + "mlp.experts.gate_up_proj")  # (E, 2F, D): gate, then up
            out[q + "ffn.experts.w_out_EDF"] = take(p + "mlp.experts.down_proj")
            if cfg.moe.num_shared:
                _dense_in(out, take, p + "mlp.shared_expert.", q + "ffn.shared.")
                out[q + "ffn.shared_gate.weight"] = take(p + "mlp.shared_expert_gate.weight")
        else:
            _dense_in(out, take, p + "mlp.", q + "ffn.")
    left = sorted(k for k in hf_state if k not in taken and hf_state[k].numel())
    if left:
        raise ModelImportError(f"the model has weights moe-lab would not use ({', '.join(left[:3])}"
                               f"{', ...' if len(left) > 3 else ''}): it is not loaded approximately")
    return out


def _dense_in(out: dict, take, hf_prefix: str, prefix: str) -> None:
    out[prefix + "w_in.weight"] = torch.cat([take(hf_prefix + "gate_proj.weight"), take(hf_prefix + "up_proj.weight")])
    out[prefix + "w_out.weight"] = take(hf_prefix + "down_proj.weight")


def build_model(hf_model: Any) -> MoETransformer:
    """The moe-lab model equal to a loaded transformers model (float32, eval mode)."""
    cfg = model_config(hf_model.config)
    model = MoETransformer(cfg)
    weights = state_dict(hf_model.state_dict(), cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelImportError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


# ------------------------------------------------------------------------------------------------------------
# The command


def import_hf(source: str, out_dir: str | Path) -> dict[str, Any]:
    """Read a transformers MoE (a local directory or a hub id) and write OUT_DIR/model.ckpt and OUT_DIR/tokenizer/."""
    from moe_lab.analysis.runs import write_atomically

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelImportError(f"{out} exists and is not an empty directory; moe-lab never writes over files: "
                               "choose a new directory")
    if not out.parent.is_dir():
        raise ModelImportError(f"{out.parent} does not exist; create it or choose another path")
    hf_config = _load(lambda: __import__("transformers").AutoConfig.from_pretrained(source), source, "config")
    cfg = model_config(hf_config)  # refuses before any weight is read
    hf_model = _load(lambda: __import__("transformers").AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32), source, "weights")
    model = build_model(hf_model)
    tokenizer = _load(lambda: __import__("transformers").AutoTokenizer.from_pretrained(source), source, "tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise ModelImportError(f"{source}: its tokenizer has no tokenizer.json (a slow tokenizer); moe-lab reads "
                               "fast tokenizers only")
    eos = tokenizer.eos_token
    tok = {"name": str(tokenizer_dir.resolve()), "eos_token": eos}
    ckpt = {
        "hyper_parameters": {"model": dataclasses.asdict(cfg), "optim": {}, "domain_names": ["all"],
                             "tokenizer": tok, "seed": 0},
        "state_dict": {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
        "global_step": 0, "epoch": 0,
        "moe_lab_imported": {"source": str(source), "family": cfg.name,
                             "transformers_class": type(hf_model).__name__},
        "moe_lab_run": {"overrides": model_overrides(cfg, tok), "run_dir": None},
    }
    path = out / CHECKPOINT
    write_atomically(path, lambda f: torch.save(ckpt, f))
    params = model.num_params()
    return {"family": cfg.name, "checkpoint": str(path), "total": params["total"], "active": params["active"],
            "layers": cfg.n_layers, "experts": cfg.moe.num_experts, "top_k": cfg.moe.router.top_k}


def _load(read, source: str, what: str):
    try:
        return read()
    except UserError:
        raise
    except Exception as e:  # a missing directory, no network for a hub id, a damaged file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelImportError(f"could not read the {what} of {source} ({type(e).__name__}: {reason}); give a "
                               "local directory written by save_pretrained or a Hugging Face hub id") from None

