"""Sharded checkpoints (torch.distributed.checkpoint folders), written by expert-parallel runs on gloo processes.

- Resharding: the step-2 checkpoint of a 2-rank run at model.moe.expert_parallel=2, saved in the background
  (checkpoint.async_save), resumes on 2 ranks at P = 2 and P = 1 and in one process (2 -> 1), each continuing the
  writer's loss curve, and on 4 ranks at P = 4 (2 -> 4), which trains as 4 ranks at P = 1 from the same checkpoint
  (up to the order in which 4 ranks' gradients are summed).
- Memory: no rank's resident memory rises during a sharded save by more than a small part of the experts' weights
  and moments, measured (Linux's high-water mark, reset before each save); the single-file format, which gathers
  every expert into each rank, is measured beside it and rises by all of them (so the measurement can fail).
- Atomic saves and files read as data: a failed save leaves the previous checkpoint whole; a killed save's folder is
  removed by the next save; an index that names code is refused without running it.
- One process reads the folder whole: `load_model`, eval, generate, analyze and export.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_distributed import (
    COMMON,
    DETERMINISTIC,
    ONE_PROCESS,
    STEPS,
    TOL,
    assert_same_final_state,
    finish,
    metrics,
    run_plan,
)

from moe_lab import files
from moe_lab.errors import CheckpointError
from moe_lab.training import sharded_checkpoint
from moe_lab.training.checkpoint import AtomicCheckpointIO, read_checkpoint
from moe_lab.training.sharded_checkpoint import ShardedWriter, is_sharded_checkpoint, save_sharded

from conftest import FAST

RANKS = ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.val_check_interval={STEPS}"]
# Experts that dominate the memory of a 2-layer model (8 experts of d_model 256, hidden 1024: 25 MB a layer).
BIG = ["model.d_model=256", "model.n_heads=4", "model.ffn_hidden=1024", "trainer.max_steps=2", "data.batch_size=2"]


def resume_from(root: Path) -> str:
    return f"ckpt_path={root / 'writer' / 'checkpoints' / 'step000002.ckpt'}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    common = [
        *COMMON,
        f"paths.cache_dir={cache_dir}",
        *DETERMINISTIC,
        "capacity=dropless",
        "checkpoint.every_n_steps=2",
    ]
    two = [*common, *RANKS, "trainer.devices=2", "data.batch_size=4"]
    plan = [
        # Saved in the background (checkpoint.async_save): what the resumes below read was written by DCP's thread.
        {"dir": str(root / "writer"), "overrides": [*two, "model.moe.expert_parallel=2", "checkpoint.async_save=true"]},
        {"dir": str(root / "ep2"), "overrides": [*two, "model.moe.expert_parallel=2", resume_from(root)]},
        {"dir": str(root / "ep1"), "overrides": [*two, "model.moe.expert_parallel=1", resume_from(root)]},
    ]
    plan += [
        {
            "dir": str(root / f"memory-{fmt}"),
            "overrides": [*two, *BIG, "model.moe.expert_parallel=2", f"checkpoint.format={fmt}"],
            "measure_saves": str(root / f"memory-{fmt}"),
        }
        for fmt in ("sharded", "file")
    ]
    # Large allocations straight from the system (and back to it when freed), so that the resident memory shows them.
    finish(run_plan(plan, root / "two.json", ranks=2, env={"MALLOC_MMAP_THRESHOLD_": "131072"}), root / "two.log")
    four = [*common, *RANKS, "trainer.devices=4", "data.batch_size=2", resume_from(root)]
    weights = weights_only(root / "writer" / "checkpoints" / "step000002.ckpt", root)
    started = [  # a new run from those weights: ckpt_path of weights only, or model.init_from
        {"dir": str(root / f"from-weights-{name}"), "overrides": [*two, f"model.moe.expert_parallel={ep}", start]}
        for name, ep, start in (
            ("ep2", 2, f"ckpt_path={weights['sharded']}"),
            ("ep1", 1, f"ckpt_path={weights['file']}"),
            ("init-from-ep2", 2, f"model.init_from={weights['sharded']}"),
        )
    ]
    one = [{"dir": str(root / "one"), "overrides": [*common, *ONE_PROCESS, resume_from(root)]}]
    later = [
        (run_plan(one, root / "one.json", ranks=1), root / "one.log"),
        (run_plan(started, root / "started.json", ranks=2), root / "started.log"),
        (
            run_plan(
                [
                    {"dir": str(root / f"four-ep{ep}"), "overrides": [*four, f"model.moe.expert_parallel={ep}"]}
                    for ep in (4, 1)
                ],
                root / "four.json",
                ranks=4,
            ),
            root / "four.log",
        ),
    ]
    for proc, log in later:
        finish(proc, log)
    return root


def weights_only(checkpoint: Path, root: Path) -> dict[str, Path]:
    """The weights and settings of `checkpoint` (no optimizer state: what `moe-lab import` writes), saved in both
    formats: a run from them starts at step 0 with a fresh optimizer."""
    ckpt = read_checkpoint(checkpoint)
    weights = {k: ckpt[k] for k in ("hyper_parameters", "state_dict", "moe_lab_run")}
    paths = {"sharded": root / "weights-sharded.ckpt", "file": root / "weights-file.ckpt"}
    save_sharded(weights, paths["sharded"], sharding=None)
    AtomicCheckpointIO().save_checkpoint(weights, paths["file"])
    return paths


@pytest.mark.slow
def test_a_new_run_from_weights_under_expert_parallelism_trains_as_without_it(runs):
    """From a checkpoint of weights only (ckpt_path=, or model.init_from=): at P = 2 each rank reads its experts' rows
    of the sharded folder (built on the meta device, then loaded), and trains step for step as P = 1 from the same
    weights in one file; all start from those weights (step 1's loss is not the writer's, which started from its
    random initialisation)."""
    b = metrics(runs / "from-weights-ep1")
    for run in ("from-weights-ep2", "from-weights-init-from-ep2"):  # ckpt_path=, model.init_from=
        a = metrics(runs / run)
        assert sorted(a["train/loss"]) == [1, 2, 3, 4]
        for key in ("train/loss", "moe/max_imbalance", "val/loss"):
            for step in b[key]:
                assert abs(a[key][step] - b[key][step]) <= TOL, (run, key, step)
        assert abs(a["train/loss"][1] - metrics(runs / "writer")["train/loss"][1]) > 1e-3
        assert_same_final_state(runs / "from-weights-ep1", runs / run, rel=1e-5)


@pytest.mark.slow
def test_expert_parallel_runs_write_sharded_checkpoints(runs):
    folder = runs / "writer" / "checkpoints" / "step000002.ckpt"
    assert is_sharded_checkpoint(folder)
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert not is_sharded_checkpoint(runs / "ep1" / "checkpoints" / "last.ckpt")  # P = 1: one file (format=auto)


def assert_continues(full: dict, after: dict) -> None:
    """The steps after the checkpoint (3 and 4) have the losses, imbalance and validation loss of `full`'s."""
    assert sorted(after["train/loss"]) == [3, 4]
    for key in ("train/loss", "moe/max_imbalance", "val/loss"):
        assert after[key], key
        for step in after[key]:
            assert abs(after[key][step] - full[key][step]) <= TOL, (key, step)


@pytest.mark.slow
@pytest.mark.parametrize("resumed", ["ep2", "ep1", "one"])
def test_a_sharded_checkpoint_resumes_under_another_layout_on_the_same_curve(runs, resumed):
    """2 -> 2, 2 -> 1 on 2 ranks, 2 -> 1 process: the steps after the checkpoint are the writer's own."""
    assert_continues(metrics(runs / "writer"), metrics(runs / resumed))
    assert_same_final_state(runs / "writer", runs / resumed, rel=1e-5)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_four_ranks_holding_two_experts_each(runs):
    """2 -> 4: four ranks at P = 4 (each reads only its 2 experts of 8) train as four at P = 1, up to the order in
    which four ranks' gradients are summed (float rounding: measured 4e-9 on weights of 0.09)."""
    assert sorted(metrics(runs / "four-ep4")["train/loss"]) == [3, 4]
    assert is_sharded_checkpoint(runs / "four-ep4" / "checkpoints" / "last.ckpt")
    assert sorted(p.name for p in (runs / "four-ep4" / "checkpoints" / "last.ckpt").iterdir())[1:5] == [
        f"__{rank}_0.distcp" for rank in range(4)
    ]
    assert_same_final_state(runs / "four-ep1", runs / "four-ep4", rel=1e-5)
    assert_continues(metrics(runs / "four-ep1"), metrics(runs / "four-ep4"))


def expert_bytes(checkpoint: dict) -> int:
    """The bytes of every expert's weights and Adam moments (what a gathering save puts in each rank)."""
    names = {n for n in checkpoint["state_dict"] if n.endswith(("w_in_EGFD", "w_out_EDF"))}
    weights = sum(checkpoint["state_dict"][n].nbytes for n in names)
    return 3 * weights  # the weights, exp_avg and exp_avg_sq


@pytest.mark.slow
def test_no_rank_holds_every_expert_during_a_sharded_save(runs):
    whole = expert_bytes(read_checkpoint(runs / "memory-file" / "checkpoints" / "last.ckpt")) / 1024
    assert whole > 100 * 1024  # 150 MB: far above the noise of a process's resident memory
    rises = {}
    for fmt in ("sharded", "file"):
        for rank in (0, 1):
            saves = [
                json.loads(line) for line in Path(f"{runs / f'memory-{fmt}'}.rank{rank}.jsonl").read_text().splitlines()
            ]
            assert saves, (fmt, rank)
            rises[fmt, rank] = max(s["peak_kib"] - s["before_kib"] for s in saves)
    for rank in (0, 1):
        assert rises["sharded", rank] < 0.15 * whole, (rises, whole)  # measured: a few MB
        # The control: a gathering save raises each rank's memory by most of the whole (measured 0.89-1.33x of it:
        # pages an earlier save freed but the allocator kept are reused without a rise), far above the sharded one.
        assert rises["file", rank] > 0.5 * whole, (rises, whole)


# -- one process ------------------------------------------------------------------------------------------------


@pytest.fixture
def sharded(real_checkpoint, tmp_path) -> Path:
    """The real 3-step run's checkpoint, written in the sharded format by one process."""
    folder = tmp_path / "checkpoints" / "last.ckpt"
    save_sharded(read_checkpoint(real_checkpoint), folder, sharding=None)
    return folder


def test_one_process_reads_a_sharded_checkpoint_whole(sharded, real_checkpoint):
    a, b = read_checkpoint(sharded), read_checkpoint(real_checkpoint)
    assert a["global_step"] == b["global_step"] and a["hyper_parameters"] == b["hyper_parameters"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[s][k], sb[s][k]) for s in sb for k in sb[s])


def test_every_tool_reads_a_sharded_checkpoint(sharded, real_checkpoint, cache_dir, tmp_path, capsys):
    import moe_lab
    from moe_lab.cli.main import main

    ids = torch.randint(0, 200, (1, 16))
    torch.testing.assert_close(
        moe_lab.load_model(sharded)(ids), moe_lab.load_model(real_checkpoint)(ids), rtol=0, atol=0
    )
    data = [o for o in FAST if o.startswith(("data.", "++data."))]
    assert main(["eval", str(sharded), *data, f"paths.cache_dir={cache_dir}", "--json", str(tmp_path / "e.json")]) == 0
    assert main(["generate", str(sharded), "--prompt", "the ", "--max-new-tokens", "4"]) == 0
    assert main(["export", str(sharded), "--format", "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_a_background_save_writes_the_same_checkpoint(sharded, real_checkpoint, tmp_path):
    """checkpoint.async_save in one process: the folder is in place once the writer has been waited for."""
    writer = ShardedWriter(asynchronous=True)
    writer.save(read_checkpoint(real_checkpoint), tmp_path / "async.ckpt", sharding=None)
    writer.wait()
    a, b = read_checkpoint(tmp_path / "async.ckpt"), read_checkpoint(sharded)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    assert sorted(p.name for p in tmp_path.iterdir() if "async" in p.name) == ["async.ckpt"]


def test_background_saves_need_the_sharded_format(tmp_path):
    from moe_lab.errors import ConfigError
    from moe_lab.training.schemas import validate

    from conftest import compose_cfg

    with pytest.raises(ConfigError, match="async_save=true writes sharded checkpoints"):
        validate(compose_cfg(["checkpoint.async_save=true", "checkpoint.format=file"], output_dir=tmp_path / "run"))


def test_a_failed_save_leaves_the_previous_checkpoint_whole(sharded, monkeypatch):
    before = read_checkpoint(sharded)["state_dict"]

    def dies_midway(state_dict, storage_writer, **kwargs):
        (Path(storage_writer.path) / "__0_0.distcp").write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", dies_midway)
    changed = read_checkpoint(sharded)
    changed["state_dict"] = {k: v + 1 for k, v in changed["state_dict"].items()}
    with pytest.raises(OSError):
        save_sharded(changed, sharded, sharding=None)
    after = read_checkpoint(sharded)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in sharded.parent.iterdir()) == ["last.ckpt"]  # nothing left beside it


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_a_save_replaces_a_folder_and_removes_what_a_killed_save_left(sharded, monkeypatch, atomic_exchange):
    if not atomic_exchange:  # a filesystem without renameat2 (NFS): two renames
        monkeypatch.setattr(sharded_checkpoint, "_exchange", lambda a, b: False)
    killed = sharded.parent / ".last.ckpt.moe-lab-{}-999999999-abc.tmp".format(files._HOST)
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"a killed writer's part")
    changed = read_checkpoint(sharded)
    changed["global_step"] = 99
    save_sharded(changed, sharded, sharding=None)
    assert read_checkpoint(sharded)["global_step"] == 99
    assert sorted(p.name for p in sharded.parent.iterdir()) == ["last.ckpt"]


class _Marker:
    """Unpickled, this would create a file: what a checkpoint handed to a user must never be able to do."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_an_index_that_names_code_is_refused_without_running_it(sharded, tmp_path):
    marker = _Marker()
    marker.path = str(tmp_path / "ran")
    (sharded / ".metadata").write_bytes(pickle.dumps(marker))
    with pytest.raises(CheckpointError, match="not a readable sharded checkpoint"):
        read_checkpoint(sharded)
    assert not (tmp_path / "ran").exists()


def test_a_flipped_bit_in_a_weight_is_found(sharded):
    """Each rank's part of the weights has its SHA-256 in meta.pt; a bit flipped in the data file is an error line."""
    reader = sharded_checkpoint.SafeFileSystemReader(sharded)
    stored = reader.read_metadata().storage_data.items()
    where = next(info for index, info in stored if index.fqn == "state_dict/model.embed.weight")
    data = bytearray((sharded / where.relative_path).read_bytes())
    data[where.offset + where.length // 2] ^= 0x10  # inside the embedding's values (80 KB)
    (sharded / where.relative_path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged: its weights model.embed.weight do not match"):
        read_checkpoint(sharded)


def test_a_damaged_meta_file_is_one_error_line(sharded):
    (sharded / "meta.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not readable.*damaged"):
        read_checkpoint(sharded)


def test_a_partial_folder_is_not_a_checkpoint(sharded, tmp_path):
    partial = tmp_path / "partial.ckpt"
    shutil.copytree(sharded, partial)
    (partial / "meta.pt").unlink()
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(partial)


# -- a damaged folder, at every entry point --------------------------------------------------------------------------


def _item(folder: Path, fqn: str):
    """(data file, DCP's storage record) of the tensor `fqn` in a sharded checkpoint."""
    stored = sharded_checkpoint.SafeFileSystemReader(folder).read_metadata().storage_data.items()
    info = next(info for index, info in stored if index.fqn == fqn)
    return folder / info.relative_path, info


def _rewrite_index(folder: Path, relative_path: str) -> None:
    """Point every item of the index at `relative_path` (what a hostile or damaged .metadata can say)."""
    import dataclasses

    metadata = sharded_checkpoint.SafeFileSystemReader(folder).read_metadata()
    metadata.storage_data = {
        index: dataclasses.replace(info, relative_path=relative_path) for index, info in metadata.storage_data.items()
    }
    metadata.storage_meta = None
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def _truncate(folder: Path) -> str:
    data, _ = _item(folder, "state_dict/model.embed.weight")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return "cut short"


def _flip_item_header(folder: Path) -> str:
    data, info = _item(folder, "state_dict/model.embed.weight")
    raw = bytearray(data.read_bytes())
    raw[info.offset + 2] ^= 0xFF  # the item's own header (a zip entry written by torch.save)
    data.write_bytes(bytes(raw))
    return "not a readable sharded checkpoint"


def _data_is_a_link_to_another_file(folder: Path) -> str:
    data, _ = _item(folder, "state_dict/model.embed.weight")
    other = folder.parent / "notes.txt"
    other.write_text("not a tensor\n" * 100000)
    data.unlink()
    data.symlink_to(other)
    return "is a link"


def _index_leaves_the_folder(folder: Path) -> str:
    data, _ = _item(folder, "state_dict/model.embed.weight")
    shutil.copy(data, folder.parent / "outside.distcp")  # a real data file, but not the checkpoint's own
    _rewrite_index(folder, "../outside.distcp")
    return "outside the checkpoint folder"


def _index_names_a_fifo(folder: Path) -> str:
    import os

    os.mkfifo(folder / "pipe")  # opening it would block the reader forever
    _rewrite_index(folder, "pipe")
    return "not a regular file"


def _flip_meta(folder: Path) -> str:
    raw = bytearray((folder / "meta.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (folder / "meta.pt").write_bytes(bytes(raw))
    return "meta.pt is"


def _flip_a_moment(folder: Path) -> str:
    import io

    data, info = _item(folder, next(iter(_optimizer_keys(folder))))
    raw = bytearray(data.read_bytes())
    item = raw[info.offset : info.offset + info.length]
    values = bytes(sharded_checkpoint.tensor_bytes(torch.load(io.BytesIO(bytes(item)), weights_only=True)))
    raw[info.offset + item.find(values) + len(values) // 2] ^= 0x10  # inside Adam's second moment's values
    data.write_bytes(bytes(raw))
    return "optimizer state"


def _optimizer_keys(folder: Path) -> list[str]:
    stored = sharded_checkpoint.SafeFileSystemReader(folder).read_metadata().state_dict_metadata
    return [k for k in stored if k.startswith("optimizer_states/") and k.endswith("exp_avg_sq") and "embed" not in k]


DAMAGES = {
    f.__name__.lstrip("_"): f
    for f in (
        _truncate,
        _flip_item_header,
        _data_is_a_link_to_another_file,
        _index_leaves_the_folder,
        _index_names_a_fifo,
        _flip_meta,
        _flip_a_moment,
    )
}


def _entry_points(folder: Path, tmp_path: Path, cache_dir: Path) -> dict[str, list[str]]:
    data = [o for o in FAST if o.startswith(("data.", "++data."))] + [f"paths.cache_dir={cache_dir}"]
    return {
        "eval": ["eval", str(folder), *data],
        "generate": ["generate", str(folder), "--prompt", "the ", "--max-new-tokens", "2"],
        "export": ["export", str(folder), "--format", "hf", str(tmp_path / "hf")],
        "analyze": ["analyze", str(folder), *data, "-o", str(tmp_path / "analysis")],
        "resume": ["train", f"ckpt_path={folder}", f"hydra.run.dir={tmp_path / 'run'}", *FAST, "capacity=dropless"],
        "init_from": ["train", f"model.init_from={folder}", f"hydra.run.dir={tmp_path / 'run'}", *FAST],
    }


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_sharded_checkpoint_is_one_line_at_every_entry_point(
    damage, sharded, tmp_path, cache_dir, capsys, monkeypatch
):
    """A cut data file, a flipped byte in an item's header, in meta.pt or in an Adam moment, a data file that is a
    link, an index that leaves the folder or names a FIFO: `load_model` raises moe-lab's CheckpointError (never DCP's
    CheckpointException, a BaseException), and eval, generate, export, analyze, a resume and model.init_from each
    print one error line, exit 2 and write nothing (a resume leaves its run folder unclaimed)."""
    import signal

    from test_entry_points import one_line, run_main

    import moe_lab

    expected = DAMAGES[damage](sharded)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading the checkpoint hangs"))
    signal.alarm(120)
    try:
        if damage != "flip_a_moment":  # the weights alone are read by load_model; the moments by a resume
            with pytest.raises(CheckpointError, match=expected):
                moe_lab.load_model(sharded)
        for name, args in _entry_points(sharded, tmp_path, cache_dir).items():
            if damage == "flip_a_moment" and name != "resume":
                continue
            monkeypatch.chdir(tmp_path)
            line = one_line(*run_main(args, capsys))
            assert expected in line, (name, line)
            assert not (tmp_path / "run").exists() and not (tmp_path / "hf").exists(), name
    finally:
        signal.alarm(0)
