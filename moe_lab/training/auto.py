"""This machine's values of the `auto` settings: trainer.accelerator, trainer.precision and trainer.deterministic
`auto` (conf/trainer/auto.yaml), compile=null and optim.fused=null, chosen for the hardware at hand and said in the
run's header (`auto_choices`). `schemas.validate` resolves them once the config is typed, before it checks what
depends on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

# A run's settings: schemas.TrainConfig (not imported: the schemas import this module).
TrainConfig = Any


def resolve_auto(run: TrainConfig) -> None:
    """Replace the `auto` settings of `run` by this machine's values (in place)."""
    run.trainer = resolved_trainer(run.trainer)
    run.compile = resolved_compile(run)
    run.optim.fused = resolved_fused(run)


def resolved_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """The trainer arguments with moe-lab's `auto` values chosen for this machine (conf/trainer/auto.yaml):
    accelerator auto -> gpu where CUDA has a device, else cpu; precision auto -> bf16-mixed on a GPU with bfloat16
    and on a CPU with AMX or AVX512-BF16 (cpu_bfloat16_isa), else 32-true; deterministic auto -> true on the CPU (the
    same seed gives the same losses), Lightning's default (off) on a GPU, where several kernels have no deterministic
    version."""
    if "auto" not in (trainer.get("accelerator"), trainer.get("precision"), trainer.get("deterministic")):
        return trainer
    import torch

    out = dict(trainer)
    if out.get("accelerator") == "auto":
        out["accelerator"] = "gpu" if torch.cuda.is_available() else "cpu"
    on_gpu = out.get("accelerator") in ("gpu", "cuda")
    if out.get("precision") == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if on_gpu else cpu_bfloat16_isa() is not None
        out["precision"] = "bf16-mixed" if fast_bf16 else "32-true"
    if out.get("deterministic") == "auto":
        out["deterministic"] = None if on_gpu else True
    return out


# oneDNN's instruction sets in order (its ONEDNN_MAX_CPU_ISA values; AVX10_1_512_AMX is AVX512_CORE_AMX): a CPU held
# below AVX512_CORE_BF16 computes bfloat16 GEMMs without bfloat16 instructions, and below AVX10_1_512_AMX without AMX.
ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
)
ONEDNN_ISA_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX"}
ONEDNN_ISA_ALIASES["AVX512_CORE_AMX_FP16"] = "AVX10_1_512_AMX_FP16"


def onednn_isa_cap() -> Optional[int]:
    """The rank in ONEDNN_ISAS of the instruction set oneDNN is held to (ONEDNN_MAX_CPU_ISA, or its old name
    DNNL_MAX_CPU_ISA); None where it is not held (unset, ALL, DEFAULT, or a name oneDNN would ignore as well)."""
    import os

    value = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    value = ONEDNN_ISA_ALIASES.get(value, value)
    return ONEDNN_ISAS.index(value) if value in ONEDNN_ISAS else None


def cpu_bfloat16_isa() -> Optional[str]:
    """The instructions that make this CPU's bfloat16 GEMMs fast, as oneDNN may use them: "AMX" (4-7x float32's GEMM
    rate on 2 cores; bf16-mixed + compile trains the default model at 1.6-1.9x float32 eager's tokens/s), "AVX512-BF16"
    (bfloat16 dot products without AMX, as on AMD EPYC since Zen 4: 2.2-3x float32's GEMM rate; the default model at
    1.4-1.9x float32 eager's tokens/s on two such hosts, the same val/loss over three seeds:
    benchmarks/2026-12-07_cpu-avx512bf16/), or None: bfloat16 GEMMs are converted to float32 ones (on an AVX2 CPU
    measured at 0.55 GFLOP/s against float32's 104: 190x slower), so the run stays in float32."""
    import torch

    cap = onednn_isa_cap()
    allowed = lambda isa: cap is None or cap >= ONEDNN_ISAS.index(isa)  # noqa: E731
    if torch.cpu._is_amx_tile_supported() and allowed("AVX10_1_512_AMX"):
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported() and allowed("AVX512_CORE_BF16"):
        return "AVX512-BF16"
    return None


def resolved_compile(run: TrainConfig) -> bool:
    """compile=null -> on for a single-process CPU run in bf16-mixed without expert parallelism, where inductor can
    build its kernels (can_build_cpu_kernels); off elsewhere (float32 keeps the eager path it was measured with, and
    GPUs are not measured)."""
    if run.compile is not None:
        return run.compile
    trainer = run.trainer
    single = trainer.get("devices", 1) in (1, "1") and trainer.get("num_nodes", 1) in (1, None)
    return (
        trainer.get("accelerator") == "cpu"
        and str(trainer.get("precision")) == "bf16-mixed"
        and single
        and run.model.moe.expert_parallel == 1
        and run.model.activation_checkpointing == "none"
        and can_build_cpu_kernels()
    )


def compile_reason(run: TrainConfig) -> str:
    """Why compile=null chose what it did (resolved_compile's rule, said for the header)."""
    trainer = run.trainer
    if trainer.get("accelerator") != "cpu":
        return "eager, as compiling is not measured on GPUs"
    if str(trainer.get("precision")) != "bf16-mixed":
        return "eager, as compiling pays in bf16-mixed, not in float32"
    if not (trainer.get("devices", 1) in (1, "1") and trainer.get("num_nodes", 1) in (1, None)):
        return "eager, as compiling is measured for one process only"
    if run.model.moe.expert_parallel != 1:
        return "eager, as compiling does not go with expert parallelism"
    if run.model.activation_checkpointing != "none":
        return "eager, as compiling does not go with activation checkpointing"
    if not can_build_cpu_kernels():
        return "eager, as inductor needs a C++ compiler and Python's headers"
    return "compiled, as one CPU process in bf16-mixed trains 1.3-1.5x faster compiled, after 10-25 s of compiling"


def auto_choices(asked_trainer: Any, asked_compile: Any, run: TrainConfig) -> list[str]:
    """What the `auto` settings (trainer.precision=auto, compile=null) chose for this run and why, for its header."""
    said = []
    if asked_trainer is not None and asked_trainer.get("precision") == "auto":
        precision = run.trainer.get("precision")
        if run.trainer.get("accelerator") in ("gpu", "cuda"):
            has = "has" if precision == "bf16-mixed" else "lacks"
            said.append(f"{precision}, as the GPU {has} bfloat16")
        elif precision == "bf16-mixed":
            said.append(f"bf16-mixed, as this CPU has {cpu_bfloat16_isa()} (fast bfloat16 GEMMs)")
        else:
            said.append(f"32-true, as this CPU {cpu_without_bfloat16()}")
    if asked_compile is None:
        said.append(compile_reason(run))
    return said


def cpu_without_bfloat16() -> str:
    """Why a CPU run stays in float32, for the header: no bfloat16 instructions, or oneDNN held below them."""
    import torch

    if onednn_isa_cap() is not None and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "has bfloat16 instructions but ONEDNN_MAX_CPU_ISA holds oneDNN below them"
    return "has neither AMX nor AVX512-BF16, without which bfloat16 GEMMs are slower than float32's"


def resolved_fused(run: TrainConfig) -> bool:
    """optim.fused=null -> AdamW's fused kernel on a GPU and in bf16-mixed; the for-loop AdamW for float32 on a CPU."""
    if run.optim.fused is not None:
        return run.optim.fused
    return run.trainer.get("accelerator") in ("gpu", "cuda") or str(run.trainer.get("precision")) == "bf16-mixed"


def can_build_cpu_kernels() -> bool:
    """What inductor needs to build CPU kernels: a C++ compiler on PATH and Python's headers (Python.h)."""
    import shutil
    import sysconfig

    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return any(shutil.which(c) for c in ("g++", "c++", "clang++")) and headers.is_file()
