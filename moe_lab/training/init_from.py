"""`model.init_from=MODEL`: a run that starts from another model's weights, with a fresh optimizer at step 0.

Without `upcycle=`, it is a warm start: the run's model is MODEL's (a moe-lab checkpoint of any run, or a Hugging Face
model moe-lab reads), settings, weights and tokenizer, e.g. to continue a model on other data or with another schedule.
With `upcycle=copy|granular|drop` it is upcycling, and MODEL is dense: the dense model is a moe-lab checkpoint of an
`experts=dense` run or a Hugging Face Llama, Qwen2 or Qwen3 (a directory or a hub id). Its backbone settings (widths,
heads, vocabulary, attention variant) and its tokenizer replace the configured ones; the MoE settings (experts, router,
capacity, aux losses) stay the command line's, with experts as wide as the dense FFN (divided by upcycle.granularity).
The weights are made in `moe_lab/model/upcycled_weights.py`. A resumed upcycled run takes its backbone from its own
checkpoint, so the dense source may be gone by then.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from moe_lab.data.config import TokenizerConfig
from moe_lab.errors import ConfigError
from moe_lab.model import ModelConfig
from moe_lab.model.upcycled_weights import moe_settings, upcycled_state_dict
from moe_lab.training.checkpoint import checkpoint_model_config, is_checkpoint, read_checkpoint
from moe_lab.training.schemas import check_training_memory
from moe_lab.training.sharded_checkpoint import ShardLayout, is_sharded_checkpoint, verify_sharded


def model_source(init_from: str, dense: bool) -> tuple[ModelConfig, Optional[dict], Any]:
    """(settings, tokenizer settings, a function giving the weights) of the model `init_from` names (with `dense`,
    a Hugging Face model is read as one of the dense families). The function takes the rank's ShardLayout under
    expert parallelism (or None): a moe-lab checkpoint is then read as the rank's part (a file is mapped, its pages
    read when copied; a sharded one reads the rank's experts only); a Hugging Face model is read whole."""
    path = Path(init_from).expanduser()
    if is_checkpoint(path):
        ckpt = read_checkpoint(path, setting="model.init_from", weights=False)  # a file is checked whole here,
        if is_sharded_checkpoint(path):  # a folder in batches: a damaged one is refused before the run starts
            verify_sharded(path)
        cfg = checkpoint_model_config(ckpt, path)

        def own_weights(layout: Optional[ShardLayout] = None) -> dict[str, torch.Tensor]:
            state = read_checkpoint(path, setting="model.init_from", layout=layout)["state_dict"]
            return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}

        return cfg, ckpt["hyper_parameters"].get("tokenizer") or {}, own_weights
    if not path.exists() and (init_from.endswith(".ckpt") or path.is_absolute() or init_from.startswith((".", "~"))):
        raise ConfigError(f"model.init_from={init_from}: no such checkpoint file or model directory")
    from moe_lab.interop.huggingface import load_hf, read_hf_config, state_dict

    hf_config, cfg = read_hf_config(init_from, dense=dense)

    def weights(layout: Optional[ShardLayout] = None) -> dict[str, torch.Tensor]:
        hf = load_hf(
            lambda: __import__("transformers").AutoModelForCausalLM.from_pretrained(
                init_from, dtype=torch.float32, trust_remote_code=False
            ),
            init_from,
            "weights",
        )
        return state_dict(hf.state_dict(), cfg)

    eos = hf_config.eos_token_id if isinstance(hf_config.eos_token_id, int) else None
    return cfg, {"name": init_from, "eos_token": _token_name(init_from, eos)}, weights


def _token_name(source: str, token_id: Optional[int]) -> Optional[str]:
    if token_id is None:
        return None
    from transformers import AutoTokenizer

    name = AutoTokenizer.from_pretrained(source, trust_remote_code=False).convert_ids_to_tokens(token_id)
    return name if isinstance(name, str) else None


def apply_upcycling(run: Any, resumed: Optional[dict] = None) -> Optional[Any]:
    """For `model.init_from`: make `run.model` the settings of the model the run starts from (upcycled, or the
    source's own for a warm start) and `run.tokenizer` the source's (in place). Returns a function giving the starting
    weights, or None when resuming (`resumed`: the contents of the checkpoint resumed, which has them) or without
    init_from. ConfigError names what does not fit."""
    if run.model.init_from is None:
        return None
    method = run.upcycle.method
    if resumed is not None:
        # The run's own checkpoint holds the settings it started with; the command line's MoE settings are checked
        # against them by check_resume (upcycling: only the experts' width comes from the checkpoint).
        ckpt = resumed
        saved = checkpoint_model_config(ckpt, run.ckpt_path)
        moe = (
            saved.moe
            if method is None
            else dataclasses.replace(run.model.moe, enabled=True, expert_hidden=saved.moe.expert_hidden)
        )
        run.model = dataclasses.replace(saved, moe=moe, init_from=run.model.init_from)
        tokenizer = ckpt["hyper_parameters"].get("tokenizer") or {}
        run.tokenizer = TokenizerConfig(**{k: tokenizer.get(k) for k in ("name", "eos_token")})
        return None
    source, tokenizer, weights = model_source(run.model.init_from, dense=method is not None)
    tokenizer = tokenizer or {}
    run.tokenizer = TokenizerConfig(**{k: tokenizer.get(k) for k in ("name", "eos_token")})
    if method is None:  # a warm start: the source's model as it is
        run.model = dataclasses.replace(source, init_from=run.model.init_from)
        check_training_memory(run)
        return weights
    granularity = run.upcycle.granularity
    try:
        settings = moe_settings(source, run.model, method, granularity)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run.model = settings
    check_training_memory(run)
    seed, ratio = run.seed, run.upcycle.drop_ratio
    return lambda layout=None: upcycled_state_dict(weights(), source, settings, method, granularity, ratio, seed)
