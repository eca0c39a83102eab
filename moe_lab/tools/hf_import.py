"""`moe-lab import HF_DIR_OR_HUB_ID OUT_DIR`: a Hugging Face transformers MoE model as a moe-lab checkpoint.

It writes `OUT_DIR/model.ckpt` (the model's settings and weights, as a moe-lab checkpoint that holds weights only)
and `OUT_DIR/tokenizer/`. The checkpoint loads with `moe_lab.load_model`, generates (`moe-lab generate`), evaluates
(`moe-lab eval`) and fine-tunes (`moe-lab train ckpt_path=OUT_DIR/model.ckpt`: a new run from those weights, with a
fresh optimizer; the checkpoint carries the overrides that compose its model and tokenizer). The families are
`moe_lab/interop/families/`, the mapping of settings and weights `moe_lab/interop/huggingface.py`; weights are read
through transformers' own `from_pretrained` (a local directory or a hub id), which also undoes each family's on-disk
layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from moe_lab.data.tokenizer import HFTokenizer
from moe_lab.errors import ModelImportError
from moe_lab.interop.huggingface import build_model, layers_beyond, load_hf, model_overrides, read_hf_config
from moe_lab.training.checkpoint import tokenizer_identity, with_checksum

CHECKPOINT = "model.ckpt"


# ------------------------------------------------------------------------------------------------------------
# The command


def import_hf(source: str, out_dir: str | Path) -> dict[str, Any]:
    """Read a transformers MoE (a local directory or a hub id) and write OUT_DIR/model.ckpt and OUT_DIR/tokenizer/."""
    from moe_lab.files import write_atomically

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelImportError(
            f"{out} exists and is not an empty directory; moe-lab never writes over files: choose a new directory"
        )
    if not out.parent.is_dir():
        raise ModelImportError(f"{out.parent} does not exist; create it or choose another path")
    hf_config, cfg = read_hf_config(source)  # refuses before any weight (or code) is read
    hf_model = load_hf(
        lambda: __import__("transformers").AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, trust_remote_code=False
        ),
        source,
        "weights",
    )
    model = build_model(hf_model, _layers_beyond(source, cfg.n_layers))
    cfg = model.cfg  # with its multi-token prediction modules, where the checkpoint keeps them
    tokenizer = load_hf(
        lambda: __import__("transformers").AutoTokenizer.from_pretrained(source, trust_remote_code=False),
        source,
        "tokenizer",
    )
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise ModelImportError(
            f"{source}: its tokenizer has no tokenizer.json (a slow tokenizer); moe-lab reads fast tokenizers only"
        )
    ckpt = imported_checkpoint(cfg, model, hf_model, source, tokenizer_dir, tokenizer.eos_token)
    path = out / CHECKPOINT
    write_atomically(path, lambda f: torch.save(with_checksum(ckpt), f))
    params = model.num_params()
    return {
        "family": cfg.name,
        "checkpoint": str(path),
        "total": params["total"],
        "active": params["active"],
        "layers": cfg.n_layers,
        "experts": cfg.moe.num_experts,
        "top_k": cfg.moe.router.top_k,
    }


def _layers_beyond(source: str, n_layers: int) -> dict[str, torch.Tensor]:
    """The checkpoint's layers past the model's (multi-token prediction modules), from its safetensors files: the
    local folder, or the hub snapshot from_pretrained has just cached."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        folder = Path(
            load_hf(
                lambda: __import__("huggingface_hub").snapshot_download(
                    source, allow_patterns=["*.safetensors"], local_files_only=True
                ),
                source,
                "weights",
            )
        )
    return load_hf(lambda: layers_beyond(folder, n_layers), source, "weights")


def imported_checkpoint(
    cfg: Any, model: Any, hf_model: Any, source: str, tokenizer_dir: Path, eos: Optional[str]
) -> dict[str, Any]:
    """The checkpoint of an imported model: weights only, its settings, its tokenizer, where it came from."""
    tok = {"name": str(tokenizer_dir.resolve()), "eos_token": eos}
    return {
        "hyper_parameters": {
            "model": dataclasses.asdict(cfg),
            "optim": {},
            "domain_names": ["all"],
            "tokenizer": tok,
            "seed": 0,
        },
        "state_dict": {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
        "global_step": 0,
        "epoch": 0,
        "moe_lab_imported": {"source": str(source), "family": cfg.name, "transformers_class": type(hf_model).__name__},
        "moe_lab_run": {
            "overrides": model_overrides(cfg, tok),
            "run_dir": None,
            "tokenizer": tokenizer_identity(HFTokenizer(str(tokenizer_dir), eos)),
        },
    }


def run(args: Any) -> int:
    """`moe-lab import SOURCE OUT_DIR` with its parsed arguments: the import, then what to do with it."""
    result = import_hf(args.source, args.out_dir)
    print(
        f"moe-lab: imported {result['family']} ({result['total'] / 1e6:.1f}M parameters, "
        f"{result['active'] / 1e6:.1f}M active per token; {result['layers']} layers, {result['experts']} experts, "
        f"top-{result['top_k']}) to {result['checkpoint']}\n"
        f'  generate   moe-lab generate {result["checkpoint"]} --prompt "..."\n'
        f"  fine-tune  moe-lab train ckpt_path={result['checkpoint']} data=text data.path=..."
    )
    return 0
