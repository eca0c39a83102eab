"""Every row of the GPU table of issue 42, measured in one run, written as a README table.

    python benchmarks/gpu_table/gpu_table.py --out OUT            # one GPU, bfloat16: under 8 minutes on an H100
    python benchmarks/gpu_table/gpu_table.py --quick --out OUT    # CPU, tiny shapes: a smoke test (seconds)

Rows (the goal beside each):
  1. the MoE layer (forward + backward, bfloat16) against transformers' grouped layer and torchtitan's, at 8, 64 and
     128 experts (4096 tokens, d_model 512), with each layer's aten operations and kernels per call;
  2. the `model=base` training step (batch 16 x 1024) against its dense twin (`experts=dense`), tokens/s;
  3. compiled training against eager on `model=base`: the gradients of one step compared first, then the two
     steps timed interleaved;
  4. the layer at 128 experts top-8, 32768 tokens, d_model 2048, expert width 768 (the shape VeOmni #460 reports
     242 TFLOP/s at on an H100), in TFLOP/s of its expert GEMMs;
  5. MFU of each training step, against the dense bfloat16 peak `moe_lab.training.metrics.peak_flops` uses.

With --quick every row runs on the CPU at tiny shapes (float32 where bfloat16 is emulated, compile with
torch.compile's aot_eager backend, which builds no kernel): it checks that the script runs end to end, and its
figures are not measurements. Writes OUT/README.md and OUT/results.json; OUT must not exist yet.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from moe_lab.files import write_atomically
from moe_lab.tools.bench import baseline, cases, layer, steps

GOALS = {
    "layer": ">= 1.3x transformers' grouped layer at each size, and >= torchtitan's",
    "step": "MoE / dense >= 0.8x",
    "compile": ">= 1.2x, gradients equal to eager",
    "veomni": "TFLOP/s beside VeOmni's 242 on an H100",
    "mfu": "printed, with its peak",
}
VEOMNI_TFLOPS = 242.0


def settings(quick: bool) -> dict[str, Any]:
    """The shapes of each row: the table's on a GPU, tiny ones for the CPU smoke test."""
    if quick:
        return {
            "device": torch.device("cpu"),
            "dtype": torch.float32,
            "layer_cases": [cases.Case(f"E{e}-top{k}", 256, 64, e, k, w) for e, k, w in ((8, 2, 128), (64, 8, 32))],
            "veomni": cases.Case("E16-top4-S512-H64", 512, 64, 16, 4, 48),
            "step": ("tiny", 2, 64),
            "compile_backend": "aot_eager",
            "warmup": 1,
            "repeats": 3,
        }
    return {
        "device": torch.device("cuda"),
        "dtype": torch.bfloat16,
        "layer_cases": cases.COMPARE_CASES,
        "veomni": cases.VEOMNI_CASE,
        "step": ("base", 16, 1024),
        "compile_backend": "inductor",
        "warmup": 3,
        "repeats": 10,
    }


def layer_rows(s: dict) -> list[dict]:
    """Row 1: moe-lab's layer and the peers' on the same weights (each checked to compute the same first)."""
    rows = []
    for case in s["layer_cases"]:
        not_timed: list[dict] = []
        results = layer.time_case(case, s["device"], s["dtype"], True, False, s["warmup"], s["repeats"], not_timed)
        by = {r.impl: r for r in results}
        ours = by["grouped"]
        row = {"case": case.name, "moe_lab_ms": ours.forward_backward_ms, "ops": ours.extra, "not_timed": not_timed}
        for peer in ("hf_grouped", "torchtitan"):
            if peer in by:
                row[f"{peer}_ms"] = by[peer].forward_backward_ms
                row[f"{peer}_speedup"] = by[peer].forward_backward_ms / ours.forward_backward_ms
                row[f"{peer}_ops"] = by[peer].extra
        rows.append(row)
    return rows


def training_step_rows(s: dict) -> list[dict]:
    """Rows 2 and 5: the MoE preset's training step and its dense twin's, with MFU against `peak_flops`."""
    from moe_lab.training.metrics import peak_flops

    preset, batch, seq = s["step"]
    precision = "bf16" if s["dtype"] == torch.bfloat16 else "fp32"
    out = []
    for experts in (None, "dense"):
        step = steps.time_training_step(preset, experts, batch, seq, s["device"], precision, s["warmup"], s["repeats"])
        step["peak_flops"] = peak_flops(s["device"], "bf16-mixed" if precision == "bf16" else "32-true")
        out.append(step)
    return out


def compile_row(s: dict) -> dict:
    """Row 3: one step's gradients of the compiled model against eager's on the same weights and tokens (worst
    relative L2 error over the parameters), then the two training steps timed interleaved."""
    from moe_lab.model import MoETransformer

    preset, batch, seq = s["step"]
    device = s["device"]
    torch.manual_seed(0)
    eager = MoETransformer(steps.compose_model(preset, [])).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=s["compile_backend"])
    ids = torch.randint(0, 256, (batch, seq + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["dtype"] == torch.bfloat16)

    def gradients(model: Callable, params: torch.nn.Module) -> dict[str, torch.Tensor]:
        params.zero_grad(set_to_none=True)
        with autocast:
            out = model(ids[:, :-1], ids[:, 1:])
            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        return {n: p.grad.detach().float().clone() for n, p in params.named_parameters() if p.grad is not None}

    want, got = gradients(eager, eager), gradients(compiled, compiled_model)
    errors = {n: float((got[n] - g).norm() / g.norm().clamp(min=1e-12)) for n, g in want.items() if n in got}
    worst = max(errors, key=lambda n: errors[n])
    timed = {}
    for name, model, params in (("eager", eager, eager), ("compiled", compiled, compiled_model)):
        optimizer = torch.optim.AdamW(params.parameters(), lr=steps.STEP_LR, fused=device.type == "cuda")
        timed[name] = steps.moe_lab_step(model, ids[:, :-1], ids[:, 1:], optimizer, autocast)
    seconds = baseline.interleaved_seconds(timed, device, s["warmup"], s["repeats"])
    ratios = baseline.round_ratios(seconds["eager"], seconds["compiled"])
    return {
        "preset": preset,
        "backend": s["compile_backend"],
        "same_parameters": sorted(want) == sorted(got),
        "worst_gradient_error": errors[worst],
        "worst_gradient_parameter": worst,
        "eager_ms": 1e3 * min(seconds["eager"]),
        "compiled_ms": 1e3 * min(seconds["compiled"]),
        **ratios,
    }


def veomni_row(s: dict) -> dict:
    """Row 4: the layer at VeOmni's shape, in TFLOP/s of its expert GEMMs (`cases.expert_gemm_flops`)."""
    case = s["veomni"]
    results = layer.time_case(case, s["device"], s["dtype"], False, False, s["warmup"], s["repeats"], [])
    ms = results[0].forward_backward_ms
    return {"case": case.name, "forward_backward_ms": ms, "tflops": cases.expert_gemm_flops(case) / (ms / 1e3) / 1e12}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def readme(results: dict) -> str:
    """The table, goal beside each measured figure."""
    lines = [
        f"# GPU table: {results['machine']}",
        "",
        f"Command: `{results['command']}`; {results['seconds']:.0f} s in all. "
        + ("**--quick: a CPU smoke test, not measurements.**" if results["quick"] else "bfloat16 autocast."),
        "",
        "| row | measured | goal |",
        "|---|---|---|",
    ]
    for row in results["layer"]:
        vs = ", ".join(
            f"{peer} {row[f'{peer}_speedup']:.2f}x ({row[f'{peer}_ms']:.2f} ms)"
            for peer in ("hf_grouped", "torchtitan")
            if f"{peer}_speedup" in row
        )
        ops = row["ops"]
        lines.append(
            f"| layer {row['case']}: peer time / moe-lab's | {row['moe_lab_ms']:.2f} ms; {vs or 'no peer ran'}; "
            f"{ops.get('kernels', '-')} kernels ({ops.get('kernels_without_aux', '-')} without aux losses) | "
            f"{GOALS['layer']} |"
        )
    moe, dense = results["steps"]
    ratio = moe["tokens_per_sec"] / dense["tokens_per_sec"]
    lines.append(
        f"| `model={moe['preset']}` step / its dense twin, tokens/s | {ratio:.2f}x "
        f"({moe['tokens_per_sec']:.0f} / {dense['tokens_per_sec']:.0f}) | {GOALS['step']} |"
    )
    c = results["compile"]
    lines.append(
        f"| compiled / eager training step ({c['backend']}) | {c['speedup']:.2f}x (rounds {c['speedup_low']:.2f}-"
        f"{c['speedup_high']:.2f}); gradients: worst relative error {c['worst_gradient_error']:.1e} "
        f"({c['worst_gradient_parameter']}) | {GOALS['compile']} |"
    )
    v = results["veomni"]
    lines.append(
        f"| layer {v['case']} | {v['tflops']:.1f} TFLOP/s ({v['forward_backward_ms']:.1f} ms) | "
        f"{GOALS['veomni']} ({VEOMNI_TFLOPS:.0f}) |"
    )
    for step in results["steps"]:
        peak = step["peak_flops"]
        mfu = "no peak for this device (never a guessed one)"
        if peak:
            achieved = step["tokens_per_sec"] * step["flops_per_token"]
            mfu = f"{100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s (dense bf16 peak)"
        lines.append(f"| MFU, `{step['preset']}` | {mfu} | {GOALS['mfu']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a folder that does not exist yet")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny shapes: a smoke test")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"gpu_table: error: {out} exists; name a new folder", file=sys.stderr)
        return 2
    if not args.quick and not torch.cuda.is_available():
        print("gpu_table: error: no CUDA device here; --quick runs the CPU smoke test", file=sys.stderr)
        return 2
    s = settings(args.quick)
    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.quick else torch.get_num_threads())
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    results["command"] = "python benchmarks/gpu_table/gpu_table.py " + " ".join(argv)
    for key, measure in (("layer", layer_rows), ("steps", training_step_rows), ("compile", compile_row)):
        results[key] = measure(s)
        print(f"gpu_table: {key} done at {time.perf_counter() - start:.0f} s", flush=True)
    results["veomni"] = veomni_row(s)
    results["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True)
    write_atomically(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_atomically(out / "README.md", readme(results))
    print(readme(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
