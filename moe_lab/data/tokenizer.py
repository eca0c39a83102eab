"""Tokenizers: byte-level by default (nothing to download), or any Hugging Face tokenizer.

Hugging Face tokenizers are loaded with the `tokenizers` library: a hub id (`gpt2`, `EleutherAI/gpt-neox-20b`)
downloads its tokenizer.json once; a local tokenizer.json, or a directory holding one, needs no network.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from moe_lab.data.config import TokenizerConfig
from moe_lab.errors import UserError
from moe_lab.hub import check_hub, looks_like_hub_id

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, and 256 as the end-of-document token."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def encode_prompt(self, text: str) -> list[int]:
        return [int(i) for i in self.encode(text)]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` from the hub or from a local tokenizer.json."""

    def __init__(self, name: str, eos_token: Optional[str] = None):
        from tokenizers import Tokenizer

        path = Path(name).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            if path.suffix == ".json" or path.exists():
                if not path.exists():
                    raise UserError(f"tokenizer.name={name}: no such file {path}")
                self._tok = Tokenizer.from_file(str(path))
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            else:  # a hub id: its tokenizer.json alone (a file of data; nothing in it runs)
                from huggingface_hub import hf_hub_download

                if not looks_like_hub_id(name):
                    raise UserError(f"tokenizer.name={name}: no such file or directory (and not a hub id)")
                check_hub(name, "the tokenizer", UserError, "tokenizer.json")

                path = Path(hf_hub_download(name, "tokenizer.json"))
                self._tok = Tokenizer.from_file(str(path))
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"could not load tokenizer {name!r} ({type(e).__name__}: {e}). tokenizer.name takes a Hugging Face "
                "hub id (needs network), a tokenizer.json or a directory holding one; null = byte-level"
            ) from None
        self.name = name
        self.fingerprint = f"hf-{digest}"
        self.vocab_size = self._tok.get_vocab_size()
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                self.eos_id = token_id
                break
        else:
            raise UserError(
                f"tokenizer {name!r} has none of the end-of-document tokens {list(candidates)}; "
                "name the one it uses with tokenizer.eos_token=..."
            )

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    @property
    def eos_token(self) -> str:
        return self._tok.id_to_token(self.eos_id)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as the model's own tokenizer frames one (a beginning-of-text token, where it adds one)."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def build_tokenizer(cfg: TokenizerConfig):
    return ByteTokenizer() if cfg.name is None else HFTokenizer(cfg.name, cfg.eos_token)
