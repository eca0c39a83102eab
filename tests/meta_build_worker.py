"""One rank of an expert-parallel build, its resident memory measured (test_meta_build.py). Usage, under torchrun
(gloo): python meta_build_worker.py OUT_DIR MODE [CHECKPOINT], MODE "meta" (the expert banks built on the meta device,
each rank materialising its share, as `moe-lab train` under expert parallelism builds them) or "whole" (every expert
built, then the rank's share kept: the control). With CHECKPOINT (one file holding every expert), the rank then loads
it as the expert-parallel strategy does, for a resume and for a new run from its weights. Writes
OUT_DIR/MODE.rankN.json: the high-water marks of resident memory (KiB) above the memory before the build, after the
build and after each load, and the bytes of the rank's experts and of everything else."""

from __future__ import annotations

import gc
import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moe_lab.model import ModelConfig, MoEConfig
from moe_lab.training.checkpoint import AtomicCheckpointIO, read_checkpoint
from moe_lab.training.module import MoELanguageModel
from moe_lab.training.start import StartingPoint
from moe_lab.training.strategy import own_rows


def kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> int:
    """Forget the high-water mark (Linux's clear_refs 5); the resident memory now, KiB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return kib("VmRSS")


def model_settings() -> ModelConfig:
    """64 experts whose weights (806 MB in all) dwarf the dense part (about 3 MB), in 2 MoE layers."""
    moe = MoEConfig(num_experts=64, expert_hidden=2048, expert_parallel=4, router={"name": "topk", "top_k": 2})
    return ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4, ffn_hidden=512, max_seq_len=64, moe=moe)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    checkpoint = sys.argv[3] if len(sys.argv) > 3 else None
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    before = reset_peak()
    module = MoELanguageModel(model_settings(), {}, seed=0, experts_on_meta=mode == "meta")
    module.model.use_expert_parallel(dist.group.WORLD, rank, size)
    built = kib("VmHWM") - before
    banks = [m.experts for m in module.model.moe_modules()]
    own = sum(getattr(b, n).nbytes for b in banks for n in b.expert_weights)
    everything = sum(p.nbytes for p in module.parameters()) + sum(b.nbytes for b in module.buffers())
    record = {"built_kib": built, "own_expert_bytes": own, "other_bytes": everything - own}
    if checkpoint is not None:
        reset_peak()
        before = kib("VmRSS")
        state = AtomicCheckpointIO().load_checkpoint(checkpoint)["state_dict"]  # a resume's read
        module.load_state_dict(own_rows(module, state))  # as MoEDDPStrategy.load_model_state_dict
        del state
        record["loaded_kib"] = kib("VmHWM") - before
        record["first_weights"] = {n: float(p.flatten()[0]) for n, p in module.named_parameters() if "experts" in n}
        # A new run from the checkpoint's weights (a fine-tune of an imported model): the run checked it against its
        # checksum before building (check_resume, in this process), then the strategy copies in the rank's rows.
        read_checkpoint(checkpoint, weights=False)
        gc.collect()
        reset_peak()
        before = kib("VmRSS")
        module.load_weights(own_rows(module, StartingPoint(init_from=checkpoint).read_weights()), checkpoint)
        record["init_from_kib"] = kib("VmHWM") - before
    (out / f"{mode}.rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
