"""Data: the embedded corpus, local files and `datasets` builders (the hub code path on local files), tokenizers,
caching, the resumable sampler and the errors bad data gets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_lab.data import datamodule as dm_module
from moe_lab.data.config import EmbeddedDataConfig, HFDataConfig, TextDataConfig, TokenizerConfig
from moe_lab.data.datamodule import LMDataModule, ResumableBatchSampler, split_blocks, validation_batches
from moe_lab.data.tokenizer import ByteTokenizer, HFTokenizer
from moe_lab.errors import DataError

SMALL = dict(seq_len=32, batch_size=4, max_val_blocks=8)


def module(tmp_path, tokenizer=None, source="embedded", **data) -> LMDataModule:
    schema = {"embedded": EmbeddedDataConfig, "text": TextDataConfig, "hf": HFDataConfig}[source]
    cfg = schema(**{**SMALL, **data})
    dm = LMDataModule(cfg, tokenizer or TokenizerConfig(), str(tmp_path / "cache"), seed=0)
    dm.setup("fit")
    return dm


def write_texts(folder, n=6, words=400):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50}" for j in range(words)) + "\n")


def test_embedded_corpus_has_labelled_domains_and_is_cached(tmp_path, monkeypatch):
    dm = module(tmp_path, source="embedded", max_chars_per_domain=20_000)
    assert dm.domain_names == ["code", "docs", "math"]
    val_domains = set(dm.val_blocks.domains[dm.val_blocks.index].tolist())
    assert val_domains == {0, 1, 2}  # every domain is evaluated
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 33) and batch["domain"].shape == (4,)
    assert batch["input_ids"].max() < ByteTokenizer.vocab_size
    # Blocks carry their domain's text: math blocks are digits and operators.
    math_rows = np.flatnonzero(dm.val_blocks.domains[dm.val_blocks.index] == 2)
    text = ByteTokenizer().decode(dm.val_blocks.__getitems__(math_rows[:1])["input_ids"][0])
    assert set(text) <= set("0123456789 +-*=\n")
    # A second data module loads the cached blocks: the documents are not read again.
    monkeypatch.setattr(dm_module, "load_documents", lambda *args: pytest.fail("re-tokenised instead of cached"))
    again = module(tmp_path, source="embedded", max_chars_per_domain=20_000)
    assert len(again.train_blocks) == len(dm.train_blocks)


def test_text_files_one_document_each(tmp_path):
    write_texts(tmp_path / "texts")
    dm = module(tmp_path, source="text", path=str(tmp_path / "texts" / "*.txt"))
    assert dm.domain_names == ["text"]
    total = len(dm.train_blocks) + len(dm.val_blocks)
    tokens = sum(len((tmp_path / "texts" / f"doc{i}.txt").read_bytes()) + 1 for i in range(6))
    assert total == tokens // 33  # packed without padding, one EOS between documents


def test_jsonl_with_domain_column(tmp_path):
    rows = [{"text": f"story {i} " * 40, "lang": "en" if i % 2 else "fr"} for i in range(20)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = module(tmp_path, source="text", path=str(path), domain_column="lang")
    assert dm.domain_names == ["en", "fr"]
    assert set(np.unique(dm.train_blocks.domains).tolist()) == {0, 1}


def write_parquet(path, n=30):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "content": [f"record {i}: " + "lorem ipsum " * 30 for i in range(n)],
            "source": ["a" if i < n // 2 else "b" for i in range(n)],
        }
    )
    pq.write_table(table, path)


def test_parquet_through_text_and_through_hf_builder(tmp_path):
    path = tmp_path / "data.parquet"
    write_parquet(path)
    as_text = module(tmp_path / "t", source="text", path=str(path), text_column="content", domain_column="source")
    # data=hf with a builder name and data_files is the same datasets.load_dataset call a hub id makes.
    as_hf = module(
        tmp_path / "h", source="hf", name="parquet", data_files=str(path), text_column="content", domain_column="source"
    )
    assert as_text.domain_names == as_hf.domain_names == ["a", "b"]
    assert len(as_text.train_blocks) == len(as_hf.train_blocks)


def test_streaming_dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i} " * 30}) for i in range(60)))
    dm = module(tmp_path, source="hf", name="json", data_files=str(path), streaming=True, max_val_blocks=4)
    assert len(dm.val_blocks) == 4
    batches = iter(dm.train_dataloader())
    first, second = next(batches), next(batches)
    assert first["input_ids"].shape == (4, 33)
    assert not torch.equal(first["input_ids"], second["input_ids"])
    val_rows = {tuple(r) for r in dm.val_blocks.__getitems__(range(4))["input_ids"].tolist()}
    assert not val_rows & {tuple(r) for r in first["input_ids"].tolist()}  # validation blocks are held out


def test_hf_tokenizer_from_local_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["hello world, hello moe lab"] * 50,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<|endoftext|>"]),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path))
    assert hf.eos_id == tok.token_to_id("<|endoftext|>")
    write_texts(tmp_path / "texts", n=4, words=300)
    dm = module(
        tmp_path,
        tokenizer=TokenizerConfig(name=str(tmp_path / "tokenizer.json")),
        source="text",
        path=str(tmp_path / "texts"),
    )
    assert dm.vocab_size == tok.get_vocab_size()
    assert len(dm.train_blocks) > 0


def test_sampler_is_a_pure_function_of_the_batch_index():
    full = ResumableBatchSampler(50, 4, seed=3)
    it = iter(full)
    batches = [next(it).blocks for _ in range(30)]  # crosses epoch boundaries (50 blocks / 4 per batch)
    resumed = iter(ResumableBatchSampler(50, 4, seed=3, start=lambda: 17))
    assert [next(resumed).blocks for _ in range(13)] == batches[17:]
    epoch0 = sum(batches[:12], []) + batches[12][:2]
    assert sorted(epoch0) == list(range(50))  # each epoch is a permutation of all blocks


def test_ranks_split_the_global_batch():
    single = ResumableBatchSampler(40, 8, seed=1)
    halves = [ResumableBatchSampler(40, 4, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for i in range(12):
        assert halves[0].batch(i) + halves[1].batch(i) == single.batch(i)
    # A micro-batch's stream index is its place in the stream, whatever the world size: rank r's i-th micro-batch of
    # 4 blocks is the (2i + r)-th micro-batch of 4 that one process would draw.
    one_process = iter(ResumableBatchSampler(40, 4, seed=1))
    alone = [next(one_process) for _ in range(8)]
    ranks = [iter(h) for h in halves]
    for i in range(4):
        for r in (0, 1):
            assert next(ranks[r]) == alone[2 * i + r]


@pytest.mark.parametrize("num_blocks,batch_size", [(16, 4), (18, 4), (5, 8), (3, 1)])
def test_validation_micro_batches_do_not_depend_on_the_world_size(num_blocks, batch_size):
    """Capacity limits make a batch's output depend on which blocks share it, so every world size must see the same
    validation micro-batches; ranks with fewer get padding batches (negative positions), never a hang."""
    one = validation_batches(num_blocks, batch_size, rank=0, world_size=1)
    for world in (2, 3, 4):
        per_rank = [validation_batches(num_blocks, batch_size, r, world) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # the same number of steps on every rank
        real = [b for rank in per_rank for b in rank if min(b) >= 0]
        padding = [b for rank in per_rank for b in rank if max(b) < 0]
        assert sorted(real) == sorted(one) and len(real) + len(padding) == len(per_rank[0]) * world


def test_padding_blocks_are_marked_invalid(tmp_path):
    dm = module(tmp_path, source="embedded", max_chars_per_domain=20_000)
    batch = dm.val_blocks.__getitems__([0, 1, -1, -2])
    assert batch["valid"].tolist() == [True, True, False, False]
    assert torch.equal(batch["input_ids"][2:], batch["input_ids"][:2])  # padding repeats real blocks


def test_validation_split_per_domain():
    domains = np.array([0] * 100 + [1] * 10 + [2] * 1)
    train, val = split_blocks(domains, 0.1, max_val_blocks=1000)
    assert set(train) | set(val) == set(range(111)) and not set(train) & set(val)
    assert np.bincount(domains[val], minlength=3).tolist() == [10, 1, 0]


@pytest.mark.parametrize("cap", [1, 2, 3, 7, 32, 33, 256])
def test_max_val_blocks_is_a_cap(cap):
    """data.max_val_blocks=32 holds out 32 blocks, not 33 (each domain's share rounded up used to pass the cap)."""
    domains = np.array([0] * 5800 + [1] * 5700 + [2] * 6019)
    train, val = split_blocks(domains, 0.05, max_val_blocks=cap)
    assert len(val) == cap and set(train) | set(val) == set(range(len(domains))) and not set(train) & set(val)
    per_domain = np.bincount(domains[val], minlength=3)
    assert (per_domain >= 1).all() if cap >= 3 else per_domain.sum() == cap
    assert per_domain.max() - per_domain.min() <= max(1, cap // 50)  # in proportion to the domains' sizes


# -- errors ---------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        module(tmp_path, source="text", path=str(tmp_path / "nothing*.txt"))


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no documents|fewer tokens than one block"):
        module(tmp_path, source="text", path=str(tmp_path / "empty.txt"))


def test_too_little_text(tmp_path):
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(DataError, match="fewer tokens than one block"):
        module(tmp_path, source="text", path=str(tmp_path / "short.txt"))


def test_undecodable_file(tmp_path):
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 40)
    with pytest.raises(DataError, match="UTF-8"):
        module(tmp_path, source="text", path=str(tmp_path / "binary.txt"))


def test_missing_text_column(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x " * 100}) + "\n")
    with pytest.raises(
        DataError, match=r"data.text_column='text' is not a column of the data; its columns are \['body'\]"
    ):
        module(tmp_path, source="text", path=str(tmp_path / "d.jsonl"))


def test_unknown_tokenizer_file(tmp_path):
    from moe_lab.errors import UserError

    with pytest.raises(UserError, match="no such file"):
        HFTokenizer(str(tmp_path / "nope" / "tokenizer.json"))
