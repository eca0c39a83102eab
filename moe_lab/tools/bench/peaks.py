"""The machine's own peak: the FLOP/s of a plain GEMM, largest and at a model's FFN shape, and a training step's
fraction of it (on a CPU, where no vendor table gives a peak, that is the MFU); the machine's description."""

from __future__ import annotations

import platform

import torch

from moe_lab.tools.bench.cases import median_ms

# The machine's own peak: a large plain GEMM (m x k times k x n), the shape at which a BLAS runs closest to the
# hardware. A GPU needs a larger one to fill its multiprocessors: an H200 ran 4096 x 512 x 4096 in bfloat16 at 300-350
# TFLOP/s (benchmarks/2026-12-04_h200), far from what 8192^3 reaches.
PEAK_SHAPE = {"cpu": (4096, 512, 4096), "cuda": (8192, 8192, 8192)}
PEAK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def gemm_flops(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], warmup: int, repeats: int
) -> float:
    """FLOP/s of one plain GEMM of `shape` (m, k, n) at `dtype`: 2 m k n over its median time."""
    m, k, n = shape
    torch.manual_seed(0)
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    return 2 * m * k * n / (median_ms(lambda: torch.mm(a, b), device, warmup, repeats) / 1e3)


def machine_peaks(
    device: torch.device, model_shape: tuple[int, int, int], warmup: int, repeats: int, quick: bool = False
) -> dict[str, dict[str, float]]:
    """{dtype: {"peak": FLOP/s of the large GEMM, "model": FLOP/s at the model's own FFN shape}}, measured here: on a
    CPU no vendor table gives a peak, and the measured one is what a fraction of peak (the MFU) is taken of."""
    shape = PEAK_SHAPE.get(device.type, PEAK_SHAPE["cpu"])
    large = tuple(d // 4 for d in shape) if quick else shape
    peaks = {}
    for name, dtype in PEAK_DTYPES.items():
        peaks[name] = {
            "peak": gemm_flops(device, dtype, large, warmup, repeats),
            "model": gemm_flops(device, dtype, model_shape, warmup, repeats),
            "peak_shape": list(large),
            "model_shape": list(model_shape),
        }
    return peaks


def with_fraction_of_peak(step: dict, peaks: dict[str, dict[str, float]], bf16_at_shape: float) -> dict:
    """A training step's achieved FLOP/s (tokens/s x the model's FLOPs per token) and its fraction of the measured
    GEMM peaks: of its own precision's largest GEMM, and of the bfloat16 GEMM at its own model's FFN shape
    (`bf16_at_shape`, FLOP/s)."""
    achieved = step["tokens_per_sec"] * step["flops_per_token"]
    own = "bfloat16" if step["precision"] == "bf16" else "float32"
    return {
        **step,
        "achieved_flops": achieved,
        "of_peak": achieved / peaks[own]["peak"],
        "bf16_gemm_at_shape": bf16_at_shape,
        "of_bf16_model_peak": achieved / bf16_at_shape,
    }


def with_fractions_of_peak(steps: list[dict], peaks: dict[str, dict[str, float]], device, warmup, repeats) -> list:
    """Every step against the peaks, each at its own model's GEMM shape (measured once per shape; the peaks' own
    model shape is already measured)."""
    at_shape = {tuple(peaks["bfloat16"]["model_shape"]): peaks["bfloat16"]["model"]}
    fp32_at_shape = {tuple(peaks["float32"]["model_shape"]): peaks["float32"]["model"]}
    for s in steps:
        shape = tuple(s["gemm_shape"])
        if shape not in at_shape:
            at_shape[shape] = gemm_flops(device, torch.bfloat16, shape, warmup, repeats)
        if shape not in fp32_at_shape:
            fp32_at_shape[shape] = gemm_flops(device, torch.float32, shape, warmup, repeats)
    return [
        {
            **with_fraction_of_peak(s, peaks, at_shape[tuple(s["gemm_shape"])]),
            "fp32_gemm_at_shape": fp32_at_shape[tuple(s["gemm_shape"])],
        }
        for s in steps
    ]


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
