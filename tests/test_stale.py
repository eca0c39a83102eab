"""Nothing stale: every cache is keyed on content, never on a path and a time; a resume on another tokenizer is
refused and one on other data is said."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from moe_lab.data.config import HFDataConfig, TextDataConfig, TokenizerConfig
from moe_lab.data.datamodule import LMDataModule
from moe_lab.errors import CheckpointError, DataError
from moe_lab.training.train import train

from conftest import FAST

SMALL = dict(seq_len=16, batch_size=2, max_val_blocks=4)
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def _blocks(cfg, cache: Path) -> np.ndarray:
    dm = LMDataModule(cfg, TokenizerConfig(), str(cache), seed=0)
    dm.setup("fit")
    return np.asarray(dm.train_blocks.input_ids)


def _write(path: Path, text: str, suffix: str) -> None:
    if suffix == ".jsonl":
        path.write_text("".join(f'{{"text": "{line}"}}\n' for line in text.split(". ") if line))
    elif suffix == ".csv":
        path.write_text("text\n" + "".join(f"{line}\n" for line in text.split(". ") if line))
    else:
        path.write_text(text)


def _rewrite_keeping_time(path: Path, text: str, suffix: str) -> None:
    """As `cp -p`, `rsync -t` and `tar` leave a file: new bytes, the old modification time (and here the old size)."""
    stat = path.stat()
    _write(path, text, suffix)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_a_file_rewritten_with_its_old_size_and_time_is_read_anew(tmp_path, suffix):
    data = tmp_path / f"corpus{suffix}"
    _write(data, TEXT, suffix)
    cfg = TextDataConfig(path=str(data), **SMALL)
    before = _blocks(cfg, tmp_path / "cache")
    new_text = TEXT.replace("quick", "QUICK")  # the same size
    _rewrite_keeping_time(data, new_text, suffix)
    after = _blocks(cfg, tmp_path / "cache")
    assert not np.array_equal(before, after)
    assert "QUICK".encode()[0] in after and "quick".encode()[0] not in after[:, :0]
    # and back: the first content's cache is found again (keyed on the bytes)
    _rewrite_keeping_time(data, TEXT, suffix)
    assert np.array_equal(_blocks(cfg, tmp_path / "cache"), before)


def test_a_file_emptied_with_its_old_time_is_not_read_as_the_old_text(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    cfg = TextDataConfig(path=str(data), **SMALL)
    _blocks(cfg, tmp_path / "cache")
    stat = data.stat()
    data.write_text("")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError):
        _blocks(cfg, tmp_path / "cache")


def test_local_data_files_of_a_datasets_builder_are_keyed_on_content(tmp_path):
    data = tmp_path / "corpus.jsonl"
    _write(data, TEXT, ".jsonl")
    cfg = HFDataConfig(name="json", data_files=str(data), **SMALL)
    before = _blocks(cfg, tmp_path / "cache")
    _rewrite_keeping_time(data, TEXT.replace("lazy", "LAZY"), ".jsonl")
    assert not np.array_equal(before, _blocks(cfg, tmp_path / "cache"))


def _tokenizer(path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [" ".join(words)] * 50, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<|endoftext|>"])
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_a_tokenizer_swapped_on_resume_is_refused_and_a_moved_one_is_not(make_cfg, tmp_path, capsys):
    first = _tokenizer(tmp_path / "a" / "tokenizer.json", ["def", "return", "class", "import", "self"])
    other = _tokenizer(tmp_path / "b" / "tokenizer.json", ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"])
    train(make_cfg(f"tokenizer.name={first}", "trainer.max_steps=2", "metrics.dashboard=false", name="run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="tokenizer differs.*tokenizer.name is .* in the checkpoint but"):
        train(make_cfg(f"tokenizer.name={other}", f"ckpt_path={ckpt}", "trainer.max_steps=4", name="swapped"))
    assert not (tmp_path / "swapped").exists()
    moved = tmp_path / "moved" / "tokenizer.json"
    moved.parent.mkdir()
    shutil.copy(first, moved)  # the same tokenizer at another path: the same model
    train(
        make_cfg(
            f"tokenizer.name={moved}",
            f"ckpt_path={ckpt}",
            "trainer.max_steps=4",
            "metrics.dashboard=false",
            name="moved_run",
        )
    )
    assert "trained on other data" not in capsys.readouterr().err


TEXT_FAST = [a for a in FAST if "max_chars" not in a]


def test_a_resume_on_data_whose_content_changed_says_so(make_cfg, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT * 3)
    train(
        make_cfg(
            *TEXT_FAST,
            "data=text",
            f"data.path={data}",
            "trainer.max_steps=2",
            "metrics.dashboard=false",
            name="run",
            fast=False,
        )
    )
    _rewrite_keeping_time(data, (TEXT * 3).replace("fox", "cat"), ".txt")
    capsys.readouterr()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    train(
        make_cfg(
            *TEXT_FAST,
            "data=text",
            f"data.path={data}",
            f"ckpt_path={ckpt}",
            "trainer.max_steps=4",
            "metrics.dashboard=false",
            name="resumed",
            fast=False,
        )
    )
    assert "was trained on other data" in capsys.readouterr().err
