"""Data and tokenizer settings: one schema per data source, so a key of one source is an error under another.

`conf/data/{embedded,text,hf}.yaml` pick a source; each is typed by its class here (registered with Hydra in
`moe_lab/training/schemas.py`), and the defaults live here only. `check()` raises ValueError naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

EMBEDDED_DOMAINS = ["code", "docs", "math"]


@dataclass
class DataConfig:
    """What every data source has: how the tokens are cut into blocks and batched."""

    # Which source (set by the data=... option): embedded, text or hf.
    source: str = "embedded"
    # Tokens per training sequence; must not exceed model.max_seq_len.
    seq_len: int = 256
    # Sequences per micro-batch on each device.
    batch_size: int = 16
    # Share of token blocks held out for validation (per domain, so every domain is evaluated).
    val_fraction: float = 0.05
    # At most this many validation blocks, so validation stays cheap on large corpora.
    max_val_blocks: int = 256
    # DataLoader worker processes.
    num_workers: int = 0

    def check(self, max_seq_len: int) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(
            self.source == SOURCE_OF.get(type(self), self.source),
            f"data.source={self.source!r} does not match the data option; pick a source with data=NAME "
            f"({', '.join(SOURCES)})",
        )
        need(self.seq_len >= 1, f"data.seq_len={self.seq_len} must be at least 1")
        need(
            self.seq_len <= max_seq_len,
            f"data.seq_len={self.seq_len} is longer than the model's maximum model.max_seq_len={max_seq_len}; "
            "lower data.seq_len or raise model.max_seq_len",
        )
        need(self.batch_size >= 1, f"data.batch_size={self.batch_size} must be at least 1")
        need(0 < self.val_fraction < 1, f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        need(self.max_val_blocks >= 1, f"data.max_val_blocks={self.max_val_blocks} must be at least 1")
        need(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")


@dataclass
class EmbeddedDataConfig(DataConfig):
    """`data=embedded`: a labelled corpus built from files every Python install carries, so nothing is downloaded:
    code (the standard library's source), docs (the language reference behind help()), math (generated arithmetic).
    """

    source: str = "embedded"
    # Which domains, and how many characters of each.
    domains: list[str] = field(default_factory=lambda: list(EMBEDDED_DOMAINS))
    max_chars_per_domain: int = 1_500_000

    def check(self, max_seq_len: int) -> None:
        super().check(max_seq_len)
        unknown = [d for d in self.domains if d not in EMBEDDED_DOMAINS]
        if unknown or not self.domains:
            raise ValueError(f"data.domains={self.domains}: the embedded corpus has the domains {EMBEDDED_DOMAINS}")
        if self.max_chars_per_domain < 10_000:
            raise ValueError("data.max_chars_per_domain must be at least 10000")


@dataclass
class DocumentsConfig(DataConfig):
    """Keys of the sources that read records of text (local files and `datasets`)."""

    # The text column, and an optional column of domain labels (for routing-by-domain analysis).
    text_column: str = "text"
    domain_column: Optional[str] = None
    # Read at most this many documents (null = all).
    max_documents: Optional[int] = None

    def check(self, max_seq_len: int) -> None:
        super().check(max_seq_len)
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents={self.max_documents} must be at least 1 (or null for all)")


@dataclass
class TextDataConfig(DocumentsConfig):
    """`data=text`: local files. .txt/.md are a document per file; .json/.jsonl, .parquet and .csv a document per
    record (text in `text_column`)."""

    source: str = "text"
    # A file, a directory or a glob.
    path: Optional[str] = None

    def check(self, max_seq_len: int) -> None:
        super().check(max_seq_len)
        if not self.path:
            raise ValueError("data=text needs a file, directory or glob: data.path=FILE_OR_GLOB")


@dataclass
class HFDataConfig(DocumentsConfig):
    """`data=hf`: any dataset `datasets.load_dataset` can load (a hub id, or a builder such as json/parquet)."""

    source: str = "hf"
    # Dataset name (e.g. roneneldan/TinyStories), its configuration, split, revision and optional data_files.
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    data_files: Optional[Any] = None
    # Stream instead of downloading everything; validation is then the first blocks of the stream.
    streaming: bool = False

    def check(self, max_seq_len: int) -> None:
        super().check(max_seq_len)
        if not self.name:
            raise ValueError(
                "data=hf needs a dataset: data.name=NAME (a hub id such as roneneldan/TinyStories, "
                "or a builder such as json/parquet with data.data_files=...)"
            )


SOURCES = {"embedded": EmbeddedDataConfig, "text": TextDataConfig, "hf": HFDataConfig}
SOURCE_OF = {cls: name for name, cls in SOURCES.items()}


@dataclass
class TokenizerConfig:
    # null: byte-level (256 bytes + <eos>), nothing to download. Otherwise a Hugging Face hub id (e.g. gpt2)
    # or a local tokenizer.json (or a directory holding one), loaded with the `tokenizers` library.
    name: Optional[str] = None
    # End-of-document token of a named tokenizer; null = the first of <|endoftext|>, </s>, <eos> it has.
    eos_token: Optional[str] = None
