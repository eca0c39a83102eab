"""Hugging Face transformers <-> moe-lab: settings and weights, both ways, for the families of
`moe_lab/interop/families/` (one module each; this code names none of them).

Into moe-lab (`model_config`, `state_dict`, `build_model`): the MoE families, and for upcycling the dense ones. A
setting moe-lab cannot represent is refused with one line naming it (ModelImportError), before any weight is read: a
model is never loaded approximately.
Out of moe-lab (`hf_architecture`, `hf_config`, `hf_state_dict`, `to_hf`): the family follows the attention (its q/k
norm), then the first family in order whose router, experts and layers hold the model (`Family.cannot_express`).
Which moe-lab routers a Hugging Face MoE block can express, each router's Config says (`softmax_topk`).
The commands around these (files, tokenizers) are `moe_lab/tools/hf_import.py` and `moe_lab/tools/export.py`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, cast

import torch

from moe_lab.errors import ExportError, ModelImportError, UserError
from moe_lab.hub import check_hub, looks_like_hub_id
from moe_lab.interop.families import Family, family, supported, titles
from moe_lab.interop.families.family import rope_parameters, setting
from moe_lab.model import ModelConfig, MoELayer, MoETransformer
from moe_lab.model.router_configs import RouterConfig, registered_routers, router_config

# ------------------------------------------------------------------------------------------------------------
# Into moe-lab: settings


def read_hf_config(source: str, dense: bool = False) -> tuple[Any, ModelConfig]:
    """(transformers config, moe-lab settings) of a model directory or hub id. Two refusals come before
    transformers reads anything: a config.json whose `model_type` is not a family moe-lab reads (so custom code that
    its `auto_map` names is never imported, and transformers never asks whether to run it), and a model too large
    for this machine's memory. Every transformers call passes trust_remote_code=False besides."""
    from transformers import AutoConfig

    raw = _raw_config(source)
    check_family(raw.get("model_type"), dense, custom_code=raw.get("auto_map"), source=source)
    hf = load_hf(lambda: AutoConfig.from_pretrained(source, trust_remote_code=False), source, "config")
    cfg = model_config(hf, dense=dense)
    from moe_lab.memory import check_fits

    check_fits(
        cfg,
        8,
        f"reading {source} (its weights through transformers, then as moe-lab's)",
        "Its config.json's sizes are not those of a model this machine can load.",
    )
    return hf, cfg


def _raw_config(source: str) -> dict:
    """config.json of a model directory (read as JSON) or of a hub id (downloaded alone: no code, no weights)."""
    import json
    from pathlib import Path

    folder = Path(source).expanduser()
    if folder.is_dir():
        file = folder / "config.json"
        if not file.is_file():
            raise ModelImportError(f"{source} has no config.json: give a directory written by save_pretrained")
    elif not looks_like_hub_id(source):
        raise ModelImportError(
            f"could not read the config of {source}: no such directory (and not a hub id); give a local directory "
            "written by save_pretrained or a Hugging Face hub id (ORG/NAME)"
        )
    else:
        check_hub(source, "the model", ModelImportError, "config.json")
        file = Path(
            load_hf(lambda: __import__("huggingface_hub").hf_hub_download(source, "config.json"), source, "config")
        )
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelImportError(
            f"{file} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); restore it"
        ) from None
    if not isinstance(raw, dict):
        raise ModelImportError(f"{file} is damaged (not a JSON object); restore it")
    return raw


def check_family(model_type: Any, dense: bool = False, custom_code: Any = None, source: str = "") -> Family:
    """The family of a config's `model_type` if moe-lab reads it (the MoE families, or with `dense` the dense ones it
    upcycles), else ModelImportError. A config naming custom code (`auto_map`) is said to be refused for it."""
    where = f"{source}: " if source else ""
    code = (
        f" and names its own code (auto_map: {', '.join(sorted(custom_code))[:120]}), which moe-lab never runs"
        if isinstance(custom_code, dict) and custom_code
        else ""
    )
    found = family(model_type)
    if found is not None and found.unsupported is not None and not dense:
        raise ModelImportError(f"{where}{found.model_type} is not supported yet: {found.unsupported}")
    if found is None or found.unsupported is not None or found.moe == dense:
        names = ", ".join(f.model_type for f in supported(moe=not dense))
        if dense:
            raise ModelImportError(
                f"{where}model_type={model_type!r}{code} is not a dense model moe-lab upcycles; the families are "
                f"{names} (or a moe-lab checkpoint of an experts=dense run)"
            )
        raise ModelImportError(
            f"{where}model_type={model_type!r}{code} cannot be imported; the families moe-lab imports are {names}"
        )
    return found


def model_config(hf: Any, dense: bool = False) -> ModelConfig:
    """The moe-lab settings of a transformers config, or ModelImportError naming the part that has no equivalent.
    With `dense`, the dense families (read to upcycle) instead of the MoE ones."""
    found = check_family(getattr(hf, "model_type", None), dense)
    theta = _refuse_what_moe_lab_lacks(hf, found)
    settings = {**_backbone_settings(hf, found.model_type, theta), **_yarn_settings(hf), **found.settings(hf)}
    if found.moe:
        settings["moe"] = _moe_settings(hf, found)
    else:
        settings["moe"] = {"enabled": False}
    return _checked(ModelConfig.from_dict(settings), found.model_type)


def _backbone_settings(hf: Any, model_type: str, theta: float) -> dict[str, Any]:
    """The settings every family maps the same way: widths, heads, positions, norms, embeddings."""
    get = lambda name, default=None: setting(hf, name, default)  # noqa: E731
    d_model, n_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or d_model // n_heads
    return {
        "name": model_type,
        "vocab_size": get("vocab_size"),
        "d_model": d_model,
        "n_layers": get("num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": get("num_key_value_heads") or n_heads,
        "head_size": head_dim if head_dim * n_heads != d_model else None,
        "ffn_hidden": get("intermediate_size"),
        "max_seq_len": get("max_position_embeddings"),
        "rope_theta": float(theta),
        "norm_eps": get("rms_norm_eps"),
        "init_std": get("initializer_range", 0.02),
        "tie_embeddings": bool(get("tie_word_embeddings", False)),
    }


def _checked(cfg: ModelConfig, model_type: str) -> ModelConfig:
    try:
        cfg.check()
    except ValueError as e:
        raise ModelImportError(f"{model_type}: {e}") from None
    return cfg


def _yarn_settings(hf: Any) -> dict[str, Any]:
    """The model.rope_* settings of a config whose RoPE is YaRN (none otherwise)."""
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if _rope(hf)[0] != "yarn":
        return {}
    return {
        "rope_scaling_factor": float(rope.get("factor") or 1.0),
        "rope_original_max_seq_len": rope.get("original_max_position_embeddings"),
        "rope_beta_fast": float(rope.get("beta_fast") or 32.0),
        "rope_beta_slow": float(rope.get("beta_slow") or 1.0),
        "rope_truncate": bool(rope.get("truncate", True)),
    }


def _rope(hf: Any) -> tuple[Any, float]:
    """(rope_type, rope_theta) of a transformers config, in either of its spellings (rope_parameters, rope_scaling)."""
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    theta = rope.get("rope_theta") if isinstance(rope, dict) and rope.get("rope_theta") else None
    return rope_type, theta if theta is not None else getattr(hf, "rope_theta", 1e4)


def _moe_settings(hf: Any, found: Family) -> dict[str, Any]:
    """The `model.moe` settings of an MoE family's config: experts, shared expert, MoE layers, router, aux loss."""
    get = lambda name, default=None: setting(hf, name, default)  # noqa: E731
    n_layers = get("num_hidden_layers")
    moe_layers = found.moe_layers(hf)
    dense = sorted(set(range(n_layers)) - set(moe_layers))
    _refuse(found, not moe_layers, f"no MoE layer (the dense layers are {dense})")
    first_dense, every = _layer_pattern(moe_layers, n_layers)
    # The short form where it says the same layers, else the explicit list.
    layers: dict[str, Any] = {"first_dense_layers": first_dense, "every_n_layers": every, "layers": None}
    if first_dense is None:
        layers = {"first_dense_layers": 0, "every_n_layers": 1, "layers": moe_layers}
    shared = {
        "num_experts": get("num_local_experts") or get("num_experts"),
        "expert_hidden": get("intermediate_size"),
        "activation": _ACTIVATIONS[get("hidden_act")],
        "num_shared": 0,
        "shared_hidden": None,
        "shared_gate": False,
        # Published MoEs route every token (no capacity): import them dropless in training and evaluation.
        "capacity_factor": None,
        "eval_capacity_factor": None,
        **layers,
        "router": {
            "name": "topk",
            "top_k": get("num_experts_per_tok"),
            "score": "softmax",
            "normalize": bool(get("norm_topk_prob", False)),
        },
        "aux_loss": {"load_balance": float(get("router_aux_loss_coef", 0.0) or 0.0), "z_loss": 0.0},
    }
    own = found.moe_settings(hf)
    router = own.get("router", {})  # a family's router with its own name replaces the softmax top-k
    return {**shared, **own, "router": router if "name" in router else {**shared["router"], **router}}


# transformers' hidden_act -> moe-lab's gated activation (the MoE families' experts are gated).
_ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu"}


def _refuse(found: Family, condition: Any, part: str) -> None:
    if condition:
        ending = "imported" if found.moe else "read"
        raise ModelImportError(f"{found.model_type}: {part} has no moe-lab equivalent; the model was not {ending}")


def _refuse_what_moe_lab_lacks(hf: Any, found: Family) -> float:
    """ModelImportError for the first part of the config moe-lab lacks (those every family shares, then the
    family's own); the rope theta otherwise."""
    get = lambda name, default=None: setting(hf, name, default)  # noqa: E731
    rope_type, theta = _rope(hf)
    rope = get("rope_parameters") or get("rope_scaling") or {}
    yarn_extra = sorted(k for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None)
    act = get("hidden_act")
    gated = act in _ACTIVATIONS if found.moe else act == "silu"
    for present, part in (
        (rope_type not in (None, "default", "yarn"), f"scaled RoPE (rope_type={rope_type})"),
        (bool(yarn_extra), f"YaRN with its own attention scaling ({', '.join(yarn_extra)})"),
        (bool(get("use_sliding_window", False)), "sliding-window attention (use_sliding_window=true)"),
        (get("clip_qkv") is not None, f"clipping of q, k and v (clip_qkv={get('clip_qkv')})"),
        (
            found.moe and not found.reads_attention_bias and bool(get("attention_bias", False)),
            "attention_bias=true (a bias on the output projection)",
        ),
        (bool(get("mlp_bias", False)), "FFN biases"),
        (not gated, f"hidden_act={act} (moe-lab's gated FFNs use {'silu or tanh-gelu' if found.moe else 'silu'})"),
        *found.refusals(hf),
    ):
        _refuse(found, present, part)
    return theta


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
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(literal(v) for v in value) + "]"
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

    walk(cast(dict, flat), "")
    for key, value in (tokenizer or {}).items():
        out.append(f"tokenizer.{key}={literal(value)}")
    return out


# ------------------------------------------------------------------------------------------------------------
# Weights


def state_dict(
    hf_state: dict[str, torch.Tensor], cfg: ModelConfig, interleaved_rope: bool = False
) -> dict[str, torch.Tensor]:
    """A transformers state dict (the fused-experts layout `from_pretrained` gives) under moe-lab's names; `cfg` is
    the model's settings as `model_config` read them (its name is the family's model_type); `interleaved_rope` as
    the family says of the config (`Family.interleaved_rope`)."""
    names = check_family(cfg.name, dense=not cfg.moe.enabled)
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
        _layer_in(out, take, names, cfg, i, interleaved_rope, cfg.is_moe_layer(i))
    for depth in range(1, cfg.mtp_depth + 1):
        _mtp_in(out, take, hf_state, names, cfg, depth, interleaved_rope)
    left = sorted(k for k in hf_state if k not in taken and hf_state[k].numel())
    if left:
        raise ModelImportError(
            f"the model has weights moe-lab would not use ({', '.join(left[:3])}"
            f"{', ...' if len(left) > 3 else ''}): it is not loaded approximately"
        )
    return out


def _layer_in(out: dict, take, names: Family, cfg: ModelConfig, i: int, interleaved_rope: bool, moe: bool) -> None:
    """Layer i of a transformers model as moe-lab's block i (or, past the model's layers, as a multi-token
    prediction module's block)."""
    p = f"model.layers.{i}."
    q = f"blocks.{i}." if i < cfg.n_layers else f"mtp.{i - cfg.n_layers}.block."
    out[q + "attn_norm.weight"] = take(p + "input_layernorm.weight")
    out[q + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
    if cfg.is_linear_layer(i):  # Gated DeltaNet: the same names on both sides
        for name in _DELTANET_WEIGHTS:
            out[f"{q}attn.{name}"] = take(f"{p}{names.linear_attention}{name}")
    elif cfg.kv_lora_rank is None:
        _attention_in(out, take, p + "self_attn.", q + "attn.", cfg)
        if cfg.attention_sinks:
            out[q + "attn.sinks_H"] = take(p + names.attention_sinks)
    else:
        _latent_attention_in(out, take, p + "self_attn.", q + "attn.", cfg, interleaved_rope)
    if not moe:
        _dense_in(out, take, p + names.dense_ffn, q + "ffn.")
        return
    out[q + "ffn.router.gate_ED"] = take(p + names.router_gate)
    if names.router_bias:
        out[q + "ffn.router.bias_E"] = take(p + names.router_bias)
    if names.router_gate_bias:
        out[q + "ffn.router.gate_bias_E"] = take(p + names.router_gate_bias)
    w_in, w_out = names.experts_in(take(p + names.experts_gate_up), take(p + names.experts_down))
    out[q + "ffn.experts.w_in_EGFD"], out[q + "ffn.experts.w_out_EDF"] = w_in, w_out  # (E, 2F, D): gate, up
    if cfg.moe.expert_bias:
        out[q + "ffn.experts.b_in_EGF"] = names.gate_up_bias_in(take(p + names.experts_gate_up_bias))
        out[q + "ffn.experts.b_out_ED"] = take(p + names.experts_down_bias)
    if cfg.moe.num_shared:
        _dense_in(out, take, p + names.shared_expert, q + "ffn.shared.")
    if cfg.moe.shared_gate and names.shared_expert_gate:
        out[q + "ffn.shared_gate.weight"] = take(p + names.shared_expert_gate)


# A multi-token prediction module in DeepSeek-V3's checkpoint layout (GLM-4.5 keeps the same): layer n_layers + k - 1
# holds a decoder layer and enorm, hnorm, eh_proj (joining [embedding | hidden]: moe-lab joins [hidden | embedding]),
# shared_head.norm, and copies of the embedding and output head that moe-lab shares with the model.
_MTP_SHARED = (("embed_tokens.weight", "embed.weight"), ("shared_head.head.weight", "lm_head.weight"))


def _mtp_in(out: dict, take, hf_state: dict, names: Family, cfg: ModelConfig, depth: int, interleaved: bool) -> None:
    i = cfg.n_layers + depth - 1
    p, q = f"model.layers.{i}.", f"mtp.{depth - 1}."
    out[q + "hidden_norm.weight"] = take(p + "hnorm.weight")
    out[q + "embed_norm.weight"] = take(p + "enorm.weight")
    embedded, hidden = take(p + "eh_proj.weight").chunk(2, dim=1)
    out[q + "proj.weight"] = torch.cat([hidden, embedded], dim=1)
    out[q + "norm.weight"] = take(p + "shared_head.norm.weight")
    for theirs, ours in _MTP_SHARED:
        if p + theirs in hf_state and not torch.equal(take(p + theirs), out[ours]):
            raise ModelImportError(
                f"the multi-token prediction module's {theirs} differs from the model's {ours}; moe-lab's modules "
                "share the model's (as DeepSeek-V3 trains them): it is not loaded approximately"
            )
    _layer_in(out, take, names, cfg, i, interleaved, cfg.is_moe_layer(cfg.n_layers - 1))


def mtp_hf_state(model: MoETransformer, names: Family) -> dict[str, torch.Tensor]:
    """The multi-token prediction modules' weights in DeepSeek-V3's checkpoint layout (for a file beside the model's:
    transformers' models have no place for them)."""
    cfg, out = model.cfg, {}
    for module in model.mtp:
        i = cfg.n_layers + module.depth - 1
        p = f"model.layers.{i}."
        full = hf_state_dict_of_block(module.block, i, cfg, names)
        out.update(full)
        hidden, embedded = module.proj.weight.chunk(2, dim=1)
        out[p + "eh_proj.weight"] = torch.cat([embedded, hidden], dim=1)
        out[p + "enorm.weight"], out[p + "hnorm.weight"] = module.embed_norm.weight, module.hidden_norm.weight
        out[p + "shared_head.norm.weight"] = module.norm.weight
        out[p + "embed_tokens.weight"], out[p + "shared_head.head.weight"] = model.embed.weight, model.lm_head.weight
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


# A Gated DeltaNet block's weights (moe_lab/model/deltanet.py keeps transformers' names and layouts).
_DELTANET_WEIGHTS = (
    "in_proj_qkvz.weight",
    "in_proj_ba.weight",
    "conv1d.weight",
    "dt_bias",
    "A_log",
    "norm.weight",
    "out_proj.weight",
)


def _attention_in(out: dict, take, hf_prefix: str, prefix: str, cfg: ModelConfig) -> None:
    """Grouped-query attention: k and v fused into kv_proj; biases and q/k norms where the model has them."""
    out[prefix + "q_proj.weight"] = take(hf_prefix + "q_proj.weight")
    out[prefix + "kv_proj.weight"] = torch.cat([take(hf_prefix + "k_proj.weight"), take(hf_prefix + "v_proj.weight")])
    if cfg.qkv_bias:
        out[prefix + "q_proj.bias"] = take(hf_prefix + "q_proj.bias")
        out[prefix + "kv_proj.bias"] = torch.cat([take(hf_prefix + "k_proj.bias"), take(hf_prefix + "v_proj.bias")])
    out[prefix + "o_proj.weight"] = take(hf_prefix + "o_proj.weight")
    if cfg.out_bias:
        out[prefix + "o_proj.bias"] = take(hf_prefix + "o_proj.bias")
    if cfg.qk_norm:
        out[prefix + "q_norm.weight"] = take(hf_prefix + "q_norm.weight")
        out[prefix + "k_norm.weight"] = take(hf_prefix + "k_norm.weight")


# moe-lab's latent attention's weights -> transformers' (DeepSeek-V3's names); the query and kv_a projections' rope
# rows are reordered where the family interleaves them.
_LATENT_NAMES = {
    "q_proj": "q_proj",
    "q_a_proj": "q_a_proj",
    "q_a_norm": "q_a_layernorm",
    "q_b_proj": "q_b_proj",
    "kv_a_proj": "kv_a_proj_with_mqa",
    "kv_a_norm": "kv_a_layernorm",
    "kv_b_proj": "kv_b_proj",
    "o_proj": "o_proj",
}


def _latent_parts(cfg: ModelConfig) -> list[str]:
    query = ["q_proj"] if cfg.q_lora_rank is None else ["q_a_proj", "q_a_norm", "q_b_proj"]
    return query + ["kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj"]


def _latent_attention_in(out: dict, take, hf_prefix: str, prefix: str, cfg: ModelConfig, interleaved: bool) -> None:
    for part in _latent_parts(cfg):
        weight = take(f"{hf_prefix}{_LATENT_NAMES[part]}.weight")
        out[f"{prefix}{part}.weight"] = _rope_rows(weight, part, cfg, interleaved)


def _rope_rows(weight: torch.Tensor, part: str, cfg: ModelConfig, interleaved: bool, back: bool = False):
    """A latent attention weight with the rows of its rotary dims reordered from interleaved pairs (x0, x1), (x2, x3),
    ... to rotate-half halves (x0, x2, ..., x1, x3, ...), or `back`: the same rotation of the same q and k values, so
    the logits are unchanged (DeepSeek's apply_rotary_pos_emb_interleave is this reordering)."""
    R = cfg.rotary_dims
    if not interleaved or part not in ("q_proj", "q_b_proj", "kv_a_proj"):
        return weight
    order = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
    if back:
        order = torch.argsort(order)
    heads, width = (1, cast(int, cfg.kv_lora_rank) + R) if part == "kv_a_proj" else (cfg.n_heads, cfg.head_dim)
    rows_HXI = weight.view(heads, width, -1)
    return torch.cat([rows_HXI[:, : width - R], rows_HXI[:, width - R :][:, order]], dim=1).reshape(weight.shape)


def _dense_in(out: dict, take, hf_prefix: str, prefix: str) -> None:
    out[prefix + "w_in.weight"] = torch.cat([take(hf_prefix + "gate_proj.weight"), take(hf_prefix + "up_proj.weight")])
    out[prefix + "w_out.weight"] = take(hf_prefix + "down_proj.weight")


def build_model(hf_model: Any, beyond: Optional[dict[str, torch.Tensor]] = None) -> MoETransformer:
    """The moe-lab model equal to a loaded transformers model (float32, eval mode); `beyond` holds the checkpoint's
    layers past the model's (`layers_beyond`): its multi-token prediction modules, for a family that keeps them."""
    cfg = model_config(hf_model.config)
    found = check_family(cfg.name)
    depth = len({int(k.split(".")[2]) for k in beyond or {}})
    if depth and found.mtp_modules:
        cfg = dataclasses.replace(cfg, mtp_depth=depth)
    model = MoETransformer(cfg)
    weights = state_dict({**hf_model.state_dict(), **(beyond or {})}, cfg, found.interleaved_rope(hf_model.config))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelImportError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def layers_beyond(folder: Any, n_layers: int) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder's safetensors files that belong to layers past the model's n_layers
    (DeepSeek-V3's multi-token prediction module is layer 61 of 61): transformers' model drops them on load. Only
    those tensors are read."""
    from pathlib import Path

    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if key.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= n_layers:
                    out[key] = f.get_tensor(key)
    return out


def load_hf(read, source: str, what: str):
    try:
        return read()
    except UserError:
        raise
    except Exception as e:  # a missing directory, no network for a hub id, a damaged file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelImportError(
            f"could not read the {what} of {source} ({type(e).__name__}: {reason}); give a "
            "local directory written by save_pretrained or a Hugging Face hub id"
        ) from None


# ------------------------------------------------------------------------------------------------------------
# Out of moe-lab


def hf_routing(router: RouterConfig, num_experts: int, kind: str = "softmax") -> Optional[dict]:
    """Eval-mode routing of a moe-lab router as a Hugging Face MoE block of routing `kind` (`Family.routing`)
    expresses it ({"top_k", ...: its config's values}), or None when that block cannot route this way: the router's
    Config says (`softmax_topk`, `sigmoid_topk`)."""
    if kind == "sigmoid":
        return router.sigmoid_topk(num_experts)
    if kind == "topk_softmax":
        return router.topk_softmax(num_experts)
    routing = router.softmax_topk(num_experts)
    return None if routing is None else {"top_k": routing[0], "norm_topk_prob": routing[1]}


def exportable_routers(kind: str = "softmax") -> list[str]:
    return sorted(n for n, options in registered_routers().items() if hf_routing(options(), 8, kind) is not None)


def hf_architecture(cfg: ModelConfig) -> tuple[Family, dict]:
    """(the family that holds this model, its routing), or ExportError saying why none does. The attention decides
    first (the families with the model's q/k norm), then the first of those in order that holds the router, experts
    and layers."""
    moe = cfg.moe
    if not moe.enabled:
        raise ExportError(f"a dense model (experts=dense) is not an MoE; export supports MoE models ({titles()})")
    if moe.layer_experts is not None:
        raise ExportError(
            f"its MoE layers have different numbers of experts ({moe.layer_experts}, a model pruned to a total "
            f"budget), and {titles(last='and')} give every layer one num_experts: prune with --keep N (per layer) "
            "to export"
        )
    router = router_config(moe.router)
    if all(hf_routing(router, moe.num_experts, f.routing) is None for f in supported()):
        raise ExportError(
            f"router={router.name} ({_describe(router)}) has no Hugging Face equivalent. Export writes "
            f"{titles(last='or')}; their routings: {_routings()}"
        )
    reason: Optional[str] = f"no family moe-lab exports has its attention ({_describe_attention(cfg)})"
    for candidate in (f for f in supported() if f.holds_attention(cfg)):
        if cfg.mtp_depth and not candidate.mtp_modules:
            keeps = " and ".join(f.title for f in supported() if f.mtp_modules)
            reason = (
                f"model.mtp_depth={cfg.mtp_depth}: {candidate.title}, whose attention the model has, keeps no "
                f"multi-token prediction modules ({keeps} do), and an export would drop them"
            )
            continue
        if moe.activation not in candidate.activations or (moe.expert_bias and not candidate.expert_bias):
            bias = ", with biases" if moe.expert_bias else ""
            reason = f"{candidate.title}'s experts are {' or '.join(candidate.activations)}, not {moe.activation}{bias}"
            continue
        routing = hf_routing(router, moe.num_experts, candidate.routing)
        reason = (
            candidate.cannot_express(cfg, routing)
            if routing is not None
            else (
                f"{candidate.title}, whose attention the model has, routes by {candidate.routing} top-k: routers "
                f"{exportable_routers(candidate.routing)}; router={router.name} ({_describe(router)}) does not"
            )
        )
        if reason is None and routing is not None:
            return candidate, routing
    raise ExportError(reason or "no family moe-lab exports holds this model")


# Each routing kind a family may have (Family.routing), for the refusal that lists the routers that export.
_ROUTING_KINDS = {
    "softmax": "softmax top-k (topk with score=softmax, one group and scaling_factor=1)",
    "sigmoid": "biased sigmoid top-k (topk with score=sigmoid)",
    "topk_softmax": "softmax over the top-k logits with a gate bias (topk with gate_bias)",
}


def _routings() -> str:
    """Each routing kind, its families and the routers that export to it, for a refusal."""
    kinds = dict.fromkeys(f.routing for f in supported())
    return "; ".join(
        f"{_ROUTING_KINDS.get(kind, kind)} in {', '.join(f.title for f in supported() if f.routing == kind)}: "
        f"routers {exportable_routers(kind)}"
        for kind in kinds
    )


def _describe_attention(cfg: ModelConfig) -> str:
    if cfg.kv_lora_rank is not None:
        return "latent attention"
    partial = f", model.rope_dims={cfg.rope_dims} of {cfg.head_dim}" if cfg.rotary_dims != cfg.head_dim else ""
    return f"model.qk_norm={cfg.qk_norm}{partial}"


def _describe(router: RouterConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(router).items() if k != "name")


def hf_config(cfg: ModelConfig, architecture: Family, routing: dict, eos_id: int):
    """The transformers config of `architecture` for a moe-lab model: the settings every family shares, then its own
    (which win where they spell a shared one their way)."""
    import transformers

    config_class = getattr(transformers, architecture.config_class)
    return config_class(**{**_hf_common_settings(cfg, routing, eos_id), **architecture.hf_settings(cfg, routing)})


def _hf_common_settings(cfg: ModelConfig, routing: dict, eos_id: int) -> dict[str, Any]:
    """The transformers settings every MoE family shares."""
    moe = cfg.moe
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope_parameters(cfg),
        hidden_act="silu" if moe.activation == "swiglu" else "gelu_pytorch_tanh",
        tie_word_embeddings=cfg.tie_embeddings,
        num_experts_per_tok=routing["top_k"],
        eos_token_id=eos_id,
        bos_token_id=None,
        pad_token_id=None,
        initializer_range=cfg.init_std,
        output_router_logits=False,
        torch_dtype="float32",
        # The Switch load-balancing weight (HF's load_balancing_loss_func); HF has no z-loss.
        router_aux_loss_coef=moe.aux_loss.load_balance,
    )


def hf_state_dict(model: MoETransformer, names: Family) -> dict[str, torch.Tensor]:
    """moe-lab's weights under the names of the family `names` (the attention's and norms' are every family's)."""
    cfg = model.cfg
    out = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.blocks):
        out.update(hf_state_dict_of_block(block, i, cfg, names))
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def hf_state_dict_of_block(block, i: int, cfg: ModelConfig, names: Family) -> dict[str, torch.Tensor]:
    """Block i's weights under transformers' names (layer i)."""
    out: dict[str, torch.Tensor] = {}
    p = f"model.layers.{i}."
    out[p + "input_layernorm.weight"] = block.attn_norm.weight
    out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
    if cfg.is_linear_layer(i):
        for name in _DELTANET_WEIGHTS:
            out[f"{p}{names.linear_attention}{name}"] = block.attn.get_parameter(name)
    elif cfg.kv_lora_rank is None:
        _attention_out(out, p + "self_attn.", block.attn, cfg)
        if block.attn.sinks_H is not None:
            out[p + names.attention_sinks] = block.attn.sinks_H
    else:
        for part in _latent_parts(cfg):
            weight = getattr(block.attn, part).weight
            out[f"{p}self_attn.{_LATENT_NAMES[part]}.weight"] = _rope_rows(weight, part, cfg, True, back=True)
    ffn = block.ffn
    if isinstance(ffn, MoELayer):
        out[p + names.router_gate] = ffn.router.gate_ED
        zeros = torch.zeros(cfg.moe.num_experts)  # a router without a family's bias routes as a zero one does
        if names.router_bias:
            out[p + names.router_bias] = getattr(ffn.router, "bias_E", zeros)
        if names.router_gate_bias:
            gate_bias = getattr(ffn.router, "gate_bias_E", None)
            out[p + names.router_gate_bias] = zeros if gate_bias is None else gate_bias
        experts = ffn.experts
        gate_up, down = names.experts_out(experts.w_in_EGFD, experts.w_out_EDF)
        out[p + names.experts_gate_up], out[p + names.experts_down] = gate_up, down
        if names.expert_bias:  # experts without biases are experts with zero ones
            b_in = experts.b_in_EGF if experts.b_in_EGF is not None else torch.zeros(experts.w_in_EGFD.shape[:2])
            b_out = experts.b_out_ED if experts.b_out_ED is not None else torch.zeros(experts.w_out_EDF.shape[:2])
            out[p + names.experts_gate_up_bias] = names.gate_up_bias_out(b_in)
            out[p + names.experts_down_bias] = b_out
        if ffn.shared is not None:
            _dense(out, p + names.shared_expert, ffn.shared)
        if ffn.shared_gate is not None and names.shared_expert_gate:
            out[p + names.shared_expert_gate] = ffn.shared_gate.weight
    else:
        _dense(out, p + names.dense_ffn, ffn)
    return out


def _attention_out(out: dict, prefix: str, attn, cfg: ModelConfig) -> None:
    kv = cfg.kv_heads * cfg.head_dim
    out[prefix + "q_proj.weight"] = attn.q_proj.weight
    k, v = attn.kv_proj.weight.split([kv, kv], dim=0)  # kv_proj rows: (k | v) x heads x head dim
    out[prefix + "k_proj.weight"], out[prefix + "v_proj.weight"] = k, v
    if cfg.qkv_bias:
        out[prefix + "q_proj.bias"] = attn.q_proj.bias
        k, v = attn.kv_proj.bias.split([kv, kv], dim=0)
        out[prefix + "k_proj.bias"], out[prefix + "v_proj.bias"] = k, v
    if cfg.qk_norm:
        out[prefix + "q_norm.weight"] = attn.q_norm.weight
        out[prefix + "k_norm.weight"] = attn.k_norm.weight
    out[prefix + "o_proj.weight"] = attn.o_proj.weight
    if cfg.out_bias:
        out[prefix + "o_proj.bias"] = attn.o_proj.bias


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
        hf = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    state = hf_state_dict(model, architecture)
    missing = {k: v for k, v in hf.state_dict().items() if k not in state}
    # A family that always builds a shared expert (Qwen2-MoE) gets it at width 0 from a model without one: it adds
    # nothing.
    for name, tensor in missing.items():
        shared = (architecture.shared_expert, architecture.shared_expert_gate or architecture.shared_expert)
        if tensor.numel() and not any(part in name for part in shared):
            raise ExportError(f"no moe-lab weight for {name}")
        state[name] = torch.zeros_like(tensor)
    hf.load_state_dict(state, strict=True)
    return hf.eval()
