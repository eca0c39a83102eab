"""Runs a plan of training runs in this process, one after another, with `moe_lab.training.train.train(cfg)`.

The layout-invariance tests start it once under torchrun (2 gloo ranks: every run of the plan is a 2-rank DDP run,
the process group is set up once) and once as a plain process (1 rank), so a hundred small runs cost seconds each
rather than a process launch each. Usage: python layout_worker.py PLAN.json, where the plan is a list of
{"dir": RUN_DIR, "overrides": [...]}, and optionally "measure_saves": FILE, to record each checkpoint save's peak
resident memory above the memory before it, per rank, in FILE.rankN.jsonl (test_sharded_checkpoints.py), or
"measure_state": FILE, to record at each save the bytes of the weights and of the optimizer state this rank holds
(its shards under trainer=fsdp) in FILE.rankN.jsonl (test_fsdp.py).
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from moe_lab.training.schemas import config_dir
from moe_lab.training.train import train


def memory_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_saves(record: Path):
    """Trainer.save_checkpoint, made to append {path, before_kib, peak_kib} to `record`: the resident memory
    before the save (the high-water mark is reset there: Linux's clear_refs 5) and its high-water mark during it."""
    import lightning.pytorch as pl

    save = pl.Trainer.save_checkpoint

    def measured(self, filepath, *args, **kwargs):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = memory_kib("VmRSS")
        save(self, filepath, *args, **kwargs)
        with open(record, "a") as f:
            f.write(json.dumps({"path": str(filepath), "before_kib": before, "peak_kib": memory_kib("VmHWM")}) + "\n")

    pl.Trainer.save_checkpoint = measured


def local_bytes(value) -> int:
    """Bytes of the tensors in `value` this rank holds (a DTensor: its shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local().nbytes
    if torch.is_tensor(value):
        return value.nbytes
    if isinstance(value, dict):
        return sum(local_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(local_bytes(v) for v in value)
    return 0


def measure_state(record: Path):
    """Trainer.save_checkpoint, made to append {weights, optimizer} (bytes this rank holds) to `record` first."""
    import lightning.pytorch as pl

    save = pl.Trainer.save_checkpoint

    def measured(self, filepath, *args, **kwargs):
        weights = local_bytes(list(self.lightning_module.parameters()))
        optimizer = local_bytes([dict(s) for s in self.optimizers[0].state.values()])
        with open(record, "a") as f:
            f.write(json.dumps({"weights": weights, "optimizer": optimizer}) + "\n")
        save(self, filepath, *args, **kwargs)

    pl.Trainer.save_checkpoint = measured


def main(plan_file: str) -> None:
    import lightning.pytorch as pl

    torch.set_num_threads(1)
    unmeasured = pl.Trainer.save_checkpoint
    for run in json.loads(Path(plan_file).read_text()):
        pl.Trainer.save_checkpoint = unmeasured
        if run.get("measure_saves"):
            measure_saves(Path(f"{run['measure_saves']}.rank{os.environ.get('RANK', '0')}.jsonl"))
        if run.get("measure_state"):
            measure_state(Path(f"{run['measure_state']}.rank{os.environ.get('RANK', '0')}.jsonl"))
        torch.use_deterministic_algorithms(False)  # as a fresh process starts; trainer.deterministic=true sets it
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*run["overrides"], f"paths.output_dir={run['dir']}"])
        GlobalHydra.instance().clear()
        train(cfg)


if __name__ == "__main__":
    main(sys.argv[1])
