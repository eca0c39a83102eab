"""`moe-lab export CKPT --format hf OUT_DIR`: a moe-lab checkpoint as a Hugging Face transformers model.

It writes a model that `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads (one of the MoE families
of `moe_lab/interop/families/`, chosen and mapped by `moe_lab/interop/huggingface.py`), and its tokenizer. The model
is dropless, as `moe_lab.load_model` is by default, so its logits equal moe-lab's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moe_lab.data.config import TokenizerConfig
from moe_lab.errors import ExportError
from moe_lab.interop.huggingface import hf_architecture, mtp_hf_state, to_hf
from moe_lab.training.checkpoint import load_model, refuse_non_finite

FORMATS = ("hf",)
# The multi-token prediction modules' weights, in DeepSeek-V3's layout (layers n_layers..), beside the model's files.
MTP_FILE = "mtp.safetensors"


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
    refuse_non_finite(module.model, ckpt_path)
    tokenizer = hf_tokenizer(module.hparams.get("tokenizer"))
    model = to_hf(module.model, eos_id=tokenizer.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if module.model.cfg.mtp_depth:  # transformers' model has no place for them: a file of their own beside it
        from safetensors.torch import save

        from moe_lab.files import write_atomically

        tensors = mtp_hf_state(module.model, hf_architecture(module.model.cfg)[0])
        write_atomically(out / MTP_FILE, lambda f: f.write(save(tensors)))
    return {"architecture": type(model).__name__, "out_dir": str(out)}


def run(args: Any) -> int:
    """`moe-lab export CKPT --format hf OUT_DIR` with its parsed arguments."""
    result = export_hf(args.checkpoint, args.out_dir)
    print(
        f"moe-lab: wrote {result['architecture']} to {result['out_dir']} (dropless, as moe_lab.load_model)\n"
        f"  AutoModelForCausalLM.from_pretrained({result['out_dir']!r})"
    )
    return 0
