"""Token blocks for language modelling, from the embedded corpus, local files or any `datasets` dataset.

Pipeline: documents {text, domain} -> tokenised -> packed per domain into blocks of seq_len + 1 tokens (inputs and
shifted targets), each block keeping its domain label -> cached on disk -> split into train and validation
blocks per domain. The packed blocks are cached under `paths.cache_dir`, keyed by everything that shapes them,
so a dataset is tokenised once.

Training batches come from an endless, seeded sampler: the i-th global batch is a pure function of
(seed, i), so resuming at optimizer step k continues with exactly the batches an uninterrupted run would see,
and each data-parallel rank takes its own slice of that global batch.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from moe_lab.data.config import DataConfig, HFDataConfig, TextDataConfig, TokenizerConfig
from moe_lab.data.embedded import embedded_documents
from moe_lab.data.tokenizer import build_tokenizer
from moe_lab.errors import DataError
from moe_lab.files import files_digest
from moe_lab.hub import check_hub, looks_like_hub_id

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: local files keyed on their content, not their size and time
TEXT_BUILDERS = {
    ".txt": "text",
    ".md": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
SPLIT_SEED = 0  # the validation split does not move with the training seed, so runs stay comparable


# ------------------------------------------------------------------------------------------------------------
# Documents


def resolve_text_files(path: str) -> list[str]:
    """A file, a directory (all readable files inside) or a glob -> sorted file list; DataError if none."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        files = [str(p) for p in sorted(Path(expanded).rglob("*")) if p.is_file() and p.suffix in TEXT_BUILDERS]
    else:
        files = sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(
            f"data.path={path}: no such file, or no file matches; give a file, a directory or a glob "
            f"of {sorted(TEXT_BUILDERS)} files"
        )
    suffixes = {Path(f).suffix for f in files}
    unknown = suffixes - set(TEXT_BUILDERS)
    if unknown:
        raise DataError(f"data.path={path}: cannot read {sorted(unknown)} files; moe-lab reads {sorted(TEXT_BUILDERS)}")
    if len({TEXT_BUILDERS[s] for s in suffixes}) > 1:
        raise DataError(f"data.path={path} mixes formats {sorted(suffixes)}; point it at one kind of file")
    return files


def _load_dataset(*args, **kwargs):
    """datasets.load_dataset, with its failures turned into one clear message."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except UnicodeDecodeError as e:
        raise DataError(
            f"could not decode the data as UTF-8 text ({e.reason} at byte {e.start}); is it a text "
            "file? Convert it to UTF-8 or point data.path elsewhere"
        ) from None
    except Exception as e:  # DatasetGenerationError, FileNotFoundError, ConnectionError, ...
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            nxt = cause.__cause__ or cause.__context__
            if isinstance(nxt, UnicodeDecodeError):
                raise DataError(
                    f"could not decode the data as UTF-8 text ({nxt.reason}); is it a text file? "
                    "Convert it to UTF-8 or point data.path elsewhere"
                ) from None
            cause = nxt
        what = kwargs.get("data_files") or (args[0] if args else "")
        raise DataError(
            f"could not load dataset {what!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def local_data_files(cfg: DataConfig) -> list[str]:
    """The local files the data is read from: data=text's, and data=hf's data_files where they name local files."""
    if isinstance(cfg, TextDataConfig):
        return resolve_text_files(cfg.path)
    if isinstance(cfg, HFDataConfig) and cfg.data_files is not None:
        named = cfg.data_files.values() if isinstance(cfg.data_files, dict) else [cfg.data_files]
        paths = [p for item in named for p in ([item] if isinstance(item, str) else list(item))]
        return sorted(
            {f for p in paths for f in glob.glob(os.path.expanduser(str(p)), recursive=True) if os.path.isfile(f)}
        )
    return []


def load_documents(cfg: DataConfig, datasets_cache: Optional[Path] = None):
    """A `datasets.Dataset` (or IterableDataset when streaming) with columns text and domain (str). `datasets_cache`
    is where `datasets` keeps what it builds from local files: a folder per content digest, because its own cache
    is keyed on path and modification time (a file rewritten with its old time would read as the old text)."""
    import datasets

    cache = {"cache_dir": str(datasets_cache)} if datasets_cache is not None else {}
    if cfg.source == "embedded":
        return datasets.Dataset.from_list(list(embedded_documents(cfg.domains, cfg.max_chars_per_domain)))
    if cfg.source == "text":
        files = resolve_text_files(cfg.path)
        builder = TEXT_BUILDERS[Path(files[0]).suffix]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = _load_dataset(builder, data_files=files, split="train", **kwargs, **cache)
    else:
        if "/" in cfg.name and looks_like_hub_id(cfg.name) and not os.path.exists(cfg.name):  # not a builder, a path
            check_hub(cfg.name, "the dataset", DataError, None, repo_type="dataset")
        ds = _load_dataset(
            cfg.name,
            cfg.subset,
            split=cfg.split,
            revision=cfg.revision,
            data_files=cfg.data_files,
            streaming=cfg.streaming,
            **cache,
        )
    streaming = isinstance(cfg, HFDataConfig) and cfg.streaming
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if cfg.text_column not in columns:
        raise DataError(f"data.text_column={cfg.text_column!r} is not a column of the data; its columns are {columns}")
    if cfg.domain_column is not None and cfg.domain_column not in columns:
        raise DataError(f"data.domain_column={cfg.domain_column!r} is not a column; its columns are {columns}")
    if cfg.max_documents is not None:
        ds = ds.take(cfg.max_documents) if streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    default_domain = "text" if cfg.source == "text" else (cfg.name or "data").split("/")[-1]

    def to_text_domain(batch: dict) -> dict:
        texts = [t if isinstance(t, str) else "" if t is None else str(t) for t in batch[cfg.text_column]]
        if cfg.domain_column is None:
            domains = [default_domain] * len(texts)
        else:
            domains = [str(d) for d in batch[cfg.domain_column]]
        return {"text": texts, "domain": domains}

    return ds.map(to_text_domain, batched=True, remove_columns=columns)


# ------------------------------------------------------------------------------------------------------------
# Packing


def pack_documents(texts: list[str], domains: list[str], tokenizer, block_len: int) -> dict[str, list]:
    """Tokenise documents and cut each domain's token stream (documents joined by EOS) into blocks."""
    ids = tokenizer.encode_batch(texts)
    streams: dict[str, list[np.ndarray]] = {}
    for doc_ids, domain in zip(ids, domains):
        if len(doc_ids):
            streams.setdefault(domain, []).extend([doc_ids, np.array([tokenizer.eos_id], dtype=np.int32)])
    blocks, labels = [], []
    for domain, parts in streams.items():
        stream = np.concatenate(parts)
        n = len(stream) // block_len
        if n:
            blocks.extend(stream[: n * block_len].reshape(n, block_len))
            labels.extend([domain] * n)
    return {"input_ids": blocks, "domain": labels}


def pack_stream(documents: Iterator[dict], tokenizer, block_len: int) -> Iterator[tuple[np.ndarray, str]]:
    """Streaming packing: yields (block, domain) as soon as a domain has enough tokens."""
    buffers: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    for doc in documents:
        ids = tokenizer.encode_batch([doc["text"]])[0]
        if not len(ids):
            continue
        domain = doc["domain"]
        buffers.setdefault(domain, []).extend([ids, np.array([tokenizer.eos_id], dtype=np.int32)])
        sizes[domain] = sizes.get(domain, 0) + len(ids) + 1
        if sizes[domain] >= block_len:
            stream = np.concatenate(buffers[domain])
            n = len(stream) // block_len
            for i in range(n):
                yield stream[i * block_len : (i + 1) * block_len], domain
            rest = stream[n * block_len :]
            buffers[domain], sizes[domain] = [rest], len(rest)


# ------------------------------------------------------------------------------------------------------------
# Sampling


class MicroBatch(NamedTuple):
    """A training micro-batch as the sampler hands it to the dataset: its place in the stream of micro-batches (the
    same whatever the world size and accumulation, so per-micro-batch randomness can be seeded from it) and its
    blocks."""

    index: int
    blocks: list[int]


class BlockDataset(Dataset):
    """The blocks `index` selects from a (memory-mapped) block array, fetched a whole batch at a time.

    A position p < 0 stands for block -1 - p as padding: it is fetched, and marked `valid` False, so that every rank
    of a data-parallel run takes part in the same number of validation steps. A training batch comes as a
    `MicroBatch` and carries its stream index as "micro_batch".
    """

    def __init__(self, input_ids: np.ndarray, domains: np.ndarray, index: Optional[np.ndarray] = None):
        self.input_ids, self.domains = input_ids, domains
        self.index = np.arange(len(domains)) if index is None else np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])

    def __getitems__(self, positions) -> dict:
        extra = {}
        if isinstance(positions, MicroBatch):
            extra["micro_batch"] = positions.index
            positions = positions.blocks
        positions = np.asarray(positions)
        valid = positions >= 0
        rows = self.index[np.where(valid, positions, -1 - positions)]
        return {
            "input_ids": torch.from_numpy(np.asarray(self.input_ids[rows], dtype=np.int64)),
            "domain": torch.from_numpy(np.asarray(self.domains[rows], dtype=np.int64)),
            "valid": torch.from_numpy(valid),
            **extra,
        }


def validation_batches(num_blocks: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's validation batches. The batches are fixed (consecutive blocks, batch_size each) whatever the world
    size, so a capacity limit sees the same micro-batches on any layout; rank r takes batches r, r + W, ...; ranks
    with fewer batches get padding batches (negative positions), so every rank runs the same number of steps."""
    batches = [list(range(i, min(i + batch_size, num_blocks))) for i in range(0, num_blocks, batch_size)]
    mine = batches[rank::world_size]
    steps = math.ceil(len(batches) / world_size)
    padding = [[-1 - p for p in batches[0]]] * (steps - len(mine))
    return mine + padding


def _identity(batch):
    return batch


class ResumableBatchSampler:
    """Endless seeded batches: global batch i takes positions [i*G, (i+1)*G) of the concatenation of
    epochs, each epoch a permutation of the blocks seeded by (seed, epoch); rank r takes its slice of it.

    `start` is read when iteration begins, so a resumed run picks up at the micro-batch it stopped at.
    """

    def __init__(
        self,
        num_blocks: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: Callable[[], int] = lambda: 0,
    ):
        self.num_blocks, self.batch_size, self.seed = num_blocks, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)}
        return self._perms[epoch]

    def batch(self, i: int) -> list[int]:
        global_batch = self.batch_size * self.world_size
        positions = i * global_batch + self.rank * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = positions // self.num_blocks, positions % self.num_blocks
        return [int(self._perm(int(e))[o]) for e, o in zip(epochs, offsets)]

    def __iter__(self) -> Iterator[MicroBatch]:
        i = self.start()
        while True:
            # Rank r's i-th micro-batch holds positions [(i * W + r) * B, ...) of the stream: its stream index.
            yield MicroBatch(i * self.world_size + self.rank, self.batch(i))
            i += 1


class StreamingBlocks(IterableDataset):
    """Training batches packed on the fly from a streaming dataset (validation blocks skipped)."""

    def __init__(
        self,
        make_documents: Callable[[int], Iterator[dict]],
        tokenizer,
        block_len: int,
        batch_size: int,
        skip_blocks: int,
        domain_ids: dict[str, int],
        rank: int,
        world_size: int,
        start: Callable[[], int],
    ):
        self.make_documents, self.tokenizer, self.block_len = make_documents, tokenizer, block_len
        self.batch_size, self.skip_blocks, self.domain_ids = batch_size, skip_blocks, domain_ids
        self.rank, self.world_size, self.start = rank, world_size, start

    def _blocks(self) -> Iterator[tuple[np.ndarray, str]]:
        epoch, produced = 0, True
        while produced:
            produced = False
            stream = pack_stream(self.make_documents(epoch), self.tokenizer, self.block_len)
            for i, item in enumerate(stream):
                if epoch == 0 and i < self.skip_blocks:
                    continue
                produced = True
                yield item
            epoch += 1

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        skip = self.start() * global_batch  # replay the stream up to where a resumed run stopped
        ids, domains = [], []
        for n, (block, domain) in enumerate(self._blocks()):
            if n < skip or (n % global_batch) // self.batch_size != self.rank:
                continue
            ids.append(block)
            domains.append(self.domain_ids.setdefault(domain, len(self.domain_ids)))
            if len(ids) == self.batch_size:
                yield {
                    "input_ids": torch.from_numpy(np.stack(ids).astype(np.int64)),
                    "domain": torch.tensor(domains, dtype=torch.int64),
                    "micro_batch": (n // global_batch) * self.world_size + self.rank,
                }
                ids, domains = [], []


# ------------------------------------------------------------------------------------------------------------
# The data module


class LMDataModule(L.LightningDataModule):
    def __init__(self, data: DataConfig, tokenizer: TokenizerConfig, cache_dir: str, seed: int):
        super().__init__()
        self.cfg, self.tokenizer_cfg, self.seed = data, tokenizer, seed
        self.cache_dir = Path(os.path.expanduser(cache_dir))
        self.tokenizer = build_tokenizer(tokenizer)
        self.block_len = data.seq_len + 1  # inputs and targets shifted by one
        self.streaming = isinstance(data, HFDataConfig) and data.streaming
        self.domain_names: list[str] = []
        self.train_blocks: Optional[BlockDataset] = None
        self.val_blocks: Optional[BlockDataset] = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # -- building and caching ------------------------------------------------------------------------------

    def cache_key(self) -> str:
        """Everything that shapes the packed blocks: the source's own settings (less batching and splitting), the
        tokenizer and the block length."""
        import sys

        c = self.cfg
        shaping = {
            k: v
            for k, v in dataclasses.asdict(c).items()
            if k not in ("seq_len", "batch_size", "val_fraction", "max_val_blocks", "num_workers", "streaming")
        }
        parts = {"v": CACHE_VERSION, **shaping, "tokenizer": self.tokenizer.fingerprint, "block_len": self.block_len}
        if c.source == "embedded":
            parts["python"] = sys.version
        if self.content_digest() is not None:
            parts["files"] = self.content_digest()
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def content_digest(self) -> Optional[str]:
        """SHA-256 of the bytes of the local files the data is read from (None when it reads none), computed once:
        what keys the caches, never a file's path, size or time."""
        if not hasattr(self, "_content_digest"):
            files = local_data_files(self.cfg)
            try:
                self._content_digest = files_digest(files) if files else None
            except OSError as e:
                raise DataError(f"cannot read {e.filename}: {e.strerror}") from None
        return self._content_digest

    def _datasets_cache(self) -> Optional[Path]:
        digest = self.content_digest()
        return self.cache_dir / "datasets" / digest[:20] if digest is not None else None

    def _cache_path(self) -> Path:
        return self.cache_dir / "blocks" / self.cache_key()

    def prepare_data(self) -> None:
        """Tokenise and pack once (rank 0); later runs load the cached blocks."""
        if self.streaming:
            return
        path = self._cache_path()
        if (path / "done").exists():
            return
        docs = load_documents(self.cfg, self._datasets_cache())
        if len(docs) == 0:
            raise DataError(f"the dataset has no documents ({self.describe()})")
        log.info("tokenising %d documents (%s) into blocks of %d tokens", len(docs), self.describe(), self.block_len)
        tokenizer, block_len = self.tokenizer, self.block_len
        blocks = docs.map(
            lambda b: pack_documents(b["text"], b["domain"], tokenizer, block_len),
            batched=True,
            batch_size=512,
            remove_columns=docs.column_names,
        )
        if len(blocks) == 0:
            raise DataError(
                f"the data holds fewer tokens than one block of data.seq_len + 1 = {block_len} "
                f"({self.describe()}); add text or lower data.seq_len"
            )
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ids = np.asarray(blocks.with_format("numpy")["input_ids"], dtype=np.int32)
        names = sorted(set(blocks["domain"]))
        domain_ids = np.asarray([names.index(d) for d in blocks["domain"]], dtype=np.int16)
        np.save(tmp / "input_ids.npy", ids)
        np.save(tmp / "domains.npy", domain_ids)
        (tmp / "domain_names.json").write_text(json.dumps(names))
        (tmp / "done").write_text("")
        if path.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(path)

    def is_cached(self) -> bool:
        """Whether the blocks are already tokenised and cached (a stream is never cached)."""
        return not self.streaming and (self._cache_path() / "done").exists()

    def describe(self) -> str:
        c = self.cfg
        if c.source == "embedded":
            return f"embedded corpus {c.domains}"
        return f"data.path={c.path}" if isinstance(c, TextDataConfig) else f"data.name={c.name}"

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_blocks is not None or getattr(self, "_stream", None) is not None:
            return
        if self.streaming:
            self._setup_streaming()
            return
        self.prepare_data()
        path = self._cache_path()
        input_ids = np.load(path / "input_ids.npy", mmap_mode="r")
        domains = np.load(path / "domains.npy")
        self.domain_names = json.loads((path / "domain_names.json").read_text())
        train_idx, val_idx = split_blocks(domains, self.cfg.val_fraction, self.cfg.max_val_blocks)
        if len(train_idx) == 0 or len(val_idx) == 0:
            raise DataError(
                f"the data makes only {len(domains)} block(s) of {self.cfg.seq_len} tokens, too few for a "
                "training and a validation split; add text or lower data.seq_len"
            )
        self.train_blocks = BlockDataset(input_ids, domains, np.sort(train_idx))
        self.val_blocks = BlockDataset(input_ids, domains, val_idx)
        log.info(
            "data: %d train / %d validation blocks of %d tokens, domains %s",
            len(self.train_blocks),
            len(self.val_blocks),
            self.cfg.seq_len,  # each block holds one token more: the target of its last position
            self.domain_names,
        )

    def _setup_streaming(self) -> None:
        docs = load_documents(self.cfg, self._datasets_cache())
        self._stream = docs
        val = []
        for block, domain in pack_stream(iter(docs), self.tokenizer, self.block_len):
            val.append((block, domain))
            if len(val) >= self.cfg.max_val_blocks:
                break
        if len(val) == 0:
            raise DataError(f"the stream holds fewer tokens than one block of {self.block_len} ({self.describe()})")
        self.domain_names = sorted({d for _, d in val})
        ids = {d: i for i, d in enumerate(self.domain_names)}
        self.val_blocks = BlockDataset(np.stack([b for b, _ in val]), np.asarray([ids[d] for _, d in val]))
        self._stream_domain_ids = ids

    # -- loaders -----------------------------------------------------------------------------------------

    def _position(self) -> tuple[int, int]:
        """(rank, world size) of this process; (0, 1) outside a trainer."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _micro_batches_done(self) -> int:
        """Micro-batches per rank consumed so far: read when iteration starts, so a resumed run continues."""
        trainer = self.trainer
        return trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._position()
        if self.streaming:
            seed = self.seed

            def documents(epoch: int):
                return iter(self._stream.shuffle(seed=seed + epoch, buffer_size=10_000))

            stream = StreamingBlocks(
                documents,
                self.tokenizer,
                self.block_len,
                self.cfg.batch_size,
                len(self.val_blocks),
                self._stream_domain_ids,
                rank,
                world_size,
                self._micro_batches_done,
            )
            return DataLoader(stream, batch_size=None, num_workers=0)
        sampler = ResumableBatchSampler(
            len(self.train_blocks), self.cfg.batch_size, self.seed, rank, world_size, self._micro_batches_done
        )
        return DataLoader(
            self.train_blocks,
            batch_sampler=sampler,
            collate_fn=_identity,
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._position()
        batches = validation_batches(len(self.val_blocks), self.cfg.batch_size, rank, world_size)
        return DataLoader(self.val_blocks, batch_sampler=batches, collate_fn=_identity, num_workers=0)


def split_blocks(domains: np.ndarray, val_fraction: float, max_val_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a share of each domain's blocks (at least one where a domain has two), max_val_blocks at most in all:
    each domain's part of the cap is in proportion to its blocks, rounded up, and the rounding's excess is taken back
    from the domains that hold the most for their size, so the cap is never passed."""
    rng = np.random.default_rng(SPLIT_SEED)
    total = len(domains)
    members = [rng.permutation(np.flatnonzero(domains == d)) for d in np.unique(domains)]
    sizes = [len(idx) for idx in members]
    counts = [
        max(min(math.ceil(val_fraction * n), math.ceil(max_val_blocks * n / max(total, 1))), 1) if n >= 2 else 0
        for n in sizes
    ]
    least = 1 if max_val_blocks >= sum(c > 0 for c in counts) else 0  # one per domain, where the cap allows it
    while sum(counts) > max_val_blocks:
        i = max((i for i, c in enumerate(counts) if c > least), key=lambda i: (counts[i] / sizes[i], sizes[i]))
        counts[i] -= 1
    val = [idx[:c] for idx, c in zip(members, counts)]
    train = [idx[c:] for idx, c in zip(members, counts)]
    return np.concatenate(train), np.sort(np.concatenate(val))
