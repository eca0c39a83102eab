"""What `moe-lab bench` concludes and keeps: the ratios against moe-lab's bars (met or not), the printed table, and
bench.json and bench.csv."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Optional

from moe_lab.files import write_atomically
from moe_lab.tools.bench.cases import VEOMNI_CASE, Result, expert_gemm_flops

PEER_NAMES = ("hf_eager", "hf_grouped", "torchtitan", "olmo_core")
# moe-lab's bars (the README's Speed section). Forward + backward speed-up over the fastest peer that ran, per case:
PEER_SPEEDUP_TARGETS = {"E8-top2": 1.3, "E64-top8": 1.5, "E128-top8": 1.5}
# moe-lab's time over a dense SwiGLU of equal active parameters:
DENSE_TIME_TARGETS = {"E8-top2": 1.25, "E64-top8": 1.5}
DENSE_MEMORY_TARGET = 1.6  # activation memory of the MoE layer over the dense FFN of equal active parameters
WHOLE_MODEL_TARGET = 1.3  # whole-model training step, speed-up over transformers on the same weights
TRAINING_STEP_TARGET = 0.9  # tokens/s of the default MoE over the dense model of equal active parameters
OPERATIONS_TARGET = 1.0  # aten operations and kernels per layer forward + backward over transformers' grouped layer
PEAK_FRACTION_TARGET = 0.5  # the default training step's FLOP/s over the machine's bf16 GEMM at the model's shape


class Ratios(list):
    """(case, comparison, ratio, target, met) rows (met None: no target)."""

    def add(self, case: str, what: str, value: float, bar: float, higher_is_better: bool) -> None:
        met = value >= bar if higher_is_better else value <= bar
        self.append((case, what, value, (">= " if higher_is_better else "<= ") + f"{bar}x", met))

    def note(self, case: str, what: str, value: float) -> None:
        self.append((case, what, value, "(no target)", None))


def ratios(
    results: list[Result], steps: list[dict] = (), whole_models: list[dict] = (), dtype: str = "float32"
) -> list[tuple[str, str, float, str, Optional[bool]]]:
    """(case, comparison, ratio, target, met) against moe-lab's bars (met None: no target)."""
    by = {(r.case, r.impl): r for r in results}
    out = Ratios()
    for case in dict.fromkeys(r.case for r in results):
        ours = by.get((case, "grouped"))
        if ours is None or case.startswith("scale-"):
            continue
        peer_ratios(out, case, ours, [by[(case, p)] for p in PEER_NAMES if (case, p) in by], dtype)
        operation_ratios(out, case, ours, by.get((case, "hf_grouped")))
        dense = by.get((case, "dense"))
        if dense is not None:
            if case in DENSE_TIME_TARGETS:
                out.add(
                    case,
                    "time / dense SwiGLU of equal active params",
                    ours.forward_backward_ms / dense.forward_backward_ms,
                    DENSE_TIME_TARGETS[case],
                    False,
                )
            out.add(
                case, "activation memory / dense SwiGLU", ours.saved_mb / dense.saved_mb, DENSE_MEMORY_TARGET, False
            )
    scaling_ratios(out, results)
    for r in results:
        if r.case == VEOMNI_CASE.name and r.impl == "grouped":
            tflops = expert_gemm_flops(VEOMNI_CASE) / (r.forward_backward_ms / 1e3) / 1e12
            out.note(r.case, "expert GEMM TFLOP/s, forward + backward (VeOmni #460: 242 on an H100)", tflops)
    model_ratios(out, steps, whole_models)
    return list(out)


def peer_ratios(out: Ratios, case: str, ours: Result, peers: list[Result], dtype: str) -> None:
    """moe-lab's layer against the peers' on one case: speed and activation memory."""
    from moe_lab.tools.bench.peers import COMPUTES_IN_BF16

    # A peer that runs its GEMMs in bfloat16 in a float32 bench does cheaper math: it is shown, but the target
    # is against the fastest peer computing at moe-lab's precision.
    lower = [r for r in peers if r.impl in COMPUTES_IN_BF16 and dtype == "float32"]
    same = [r for r in peers if r not in lower]
    if same and case in PEER_SPEEDUP_TARGETS:
        best = min(same, key=lambda r: r.forward_backward_ms)
        out.add(
            case,
            f"speed-up over the fastest peer ({best.impl})",
            best.forward_backward_ms / ours.forward_backward_ms,
            PEER_SPEEDUP_TARGETS[case],
            True,
        )
    for r in lower:
        speedup = r.forward_backward_ms / ours.forward_backward_ms
        out.note(case, f"speed-up over {r.impl} (its expert GEMMs in bf16)", speedup)
    if peers:
        least = min(peers, key=lambda r: r.saved_mb)
        out.add(
            case, f"activation memory / the least peer's ({least.impl})", ours.saved_mb / least.saved_mb, 1.0, False
        )


def operation_ratios(out: Ratios, case: str, ours: Result, transformers: Optional[Result]) -> None:
    """moe-lab's operations per forward + backward against transformers' grouped layer's (on a GPU each kernel is a
    launch): without moe-lab's aux losses, as transformers computes its own outside the layer, at most its count."""
    if transformers is None or "kernels_without_aux" not in ours.extra or "kernels" not in transformers.extra:
        return
    theirs = transformers.extra
    for key, what in (("kernels", "kernels"), ("aten_ops", "aten ops")):
        no_aux = ours.extra[f"{key}_without_aux"] / theirs[key]
        out.add(case, f"{what} / transformers' (hf_grouped), no aux losses", no_aux, OPERATIONS_TARGET, False)
        out.note(case, f"{what} with the aux losses / transformers'", ours.extra[key] / theirs[key])


def scaling_ratios(out: Ratios, results: list[Result]) -> None:
    """Time from the fewest to the most experts of each scaling family (the same active compute)."""
    families: dict[str, list[Result]] = {}
    for r in results:
        if r.case.startswith("scale-") and r.impl == "grouped":
            families.setdefault(r.case.rsplit("-E", 1)[0], []).append(r)
    for family, rows in families.items():
        rows.sort(key=lambda r: r.num_experts)
        if len(rows) >= 2:
            out.add(
                f"{family}: E{rows[0].num_experts} -> E{rows[-1].num_experts}",
                f"time ratio ({rows[0].tokens} tokens, top-{rows[0].top_k}, width {rows[0].expert_hidden})",
                rows[-1].forward_backward_ms / rows[0].forward_backward_ms,
                1.2,
                False,
            )


def model_ratios(out: Ratios, steps: list[dict], whole_models: list[dict]) -> None:
    """Whole models against transformers, and the MoE training step against its dense twin."""
    for w in whole_models:
        if "speedup" in w:
            what = f"whole-model step, speed-up over transformers ({w['architecture']}, {w['dtype']})"
            out.add(w["preset"], what, w["speedup"], WHOLE_MODEL_TARGET, True)
            if "both_compiled" in w:
                what = f"whole-model step, both compiled ({w['dtype']})"
                out.add(w["preset"], what, w["both_compiled"], WHOLE_MODEL_TARGET, True)
            if "compiled_speedup" in w:
                what = f"whole-model step compiled, over transformers eager ({w['dtype']})"
                out.note(w["preset"], what, w["compiled_speedup"])
    moe = next((s for s in steps if s["preset"] == "tiny"), None)
    dense = next((s for s in steps if s["preset"] == "dense_tiny"), None)
    if moe and "of_bf16_model_peak" in moe:
        what = "training step FLOP/s / the bf16 GEMM's at the model's shape"
        if moe.get("bf16_gemm_at_shape", 0) < moe.get("fp32_gemm_at_shape", 0):
            out.note("tiny", what + " (bf16 emulated here: no bar)", moe["of_bf16_model_peak"])
        else:
            out.add("tiny", what, moe["of_bf16_model_peak"], PEAK_FRACTION_TARGET, True)
    if moe and dense:
        ratio = moe["tokens_per_sec"] / dense["tokens_per_sec"]
        out.add(
            "tiny vs dense_tiny",
            "training step tokens/s, MoE / dense of equal active",
            ratio,
            TRAINING_STEP_TARGET,
            True,
        )


def print_table(
    results: list[Result],
    steps: list[dict],
    checks: list[tuple],
    not_timed: list[dict] = (),
    whole_models: list[dict] = (),
) -> None:
    print(
        f"\n{'case':<22} {'impl':<11} {'fwd ms':>9} {'fwd+bwd ms':>11} {'saved MB':>9} {'peak MB':>9} "
        f"{'ops (kernels)':>13}  same math"
    )
    for r in results:
        peak = f"{r.peak_mb:9.0f}" if r.peak_mb is not None else f"{'-':>9}"
        ops = f"{r.extra['aten_ops']} ({r.extra['kernels']})" if "aten_ops" in r.extra else "-"
        print(
            f"{r.case:<22} {r.impl:<11} {r.forward_ms:9.2f} {r.forward_backward_ms:11.2f} {r.saved_mb:9.1f} {peak} "
            f"{ops:>13}  {r.extra.get('same_math', '')}"
        )
    for n in not_timed:
        print(f"{n['case']:<22} {n['impl']:<11} not timed: {n['reason']}")
    if steps:
        print(
            f"\n{'training step':<28} {'batch x seq':>12} {'ms':>9} {'tokens/s':>10} {'active params':>14} {'MFU':>6} "
            f"{'GFLOP/s':>8} {'of peak':>8} {'of bf16 GEMM at its shape':>26}"
        )
        for s in steps:
            mfu = f"{100 * s['mfu']:5.1f}%" if s["mfu"] is not None else f"{'-':>6}"
            measured = (
                f" {s['achieved_flops'] / 1e9:8.1f} {100 * s['of_peak']:7.1f}% {100 * s['of_bf16_model_peak']:25.1f}%"
                if "achieved_flops" in s
                else ""
            )
            print(
                f"{s['preset']:<28} {s['batch']:>5} x {s['seq_len']:<4} {s['step_ms']:9.1f} "
                f"{s['tokens_per_sec']:10.0f} {s['params_active'] / 1e6:13.2f}M {mfu}{measured}"
            )
    if whole_models:
        print(f"\n{'whole model (train step)':<34} {'moe-lab ms':>11} {'transformers ms':>16}  logits error")
        for w in whole_models:
            if "not_timed" in w:
                print(f"{w['preset']:<34} not timed: {w['not_timed']}")
            else:
                compiled = (
                    f"; compiled {w['moe_lab_compiled_ms']:.1f} against {w['transformers_compiled_ms']:.1f} ms, "
                    f"per round {w['both_compiled_low']:.2f}-{w['both_compiled_high']:.2f}x"
                    if "moe_lab_compiled_ms" in w
                    else ""
                )
                print(
                    f"{w['preset']:<34} {w['moe_lab_ms']:11.1f} {w['transformers_ms']:16.1f}  "
                    f"{w['logits_error']:.1e} ({w['architecture']}, {w['dtype']}, {w['batch']} x {w['seq_len']}, "
                    f"per round {w['speedup_low']:.2f}-{w['speedup_high']:.2f}x{compiled})"
                )
    if checks:
        print(f"\n{'case':<26} {'ratio':<58} {'measured':>9}  target")
        for case, what, value, target, met in checks:
            verdict = "" if met is None else "met" if met else "NOT MET"
            print(f"{case:<26} {what:<58} {value:8.2f}x  {target:<8} {verdict}")


def print_peaks(peaks: dict[str, dict[str, float]]) -> None:
    print(f"\n{'plain GEMM (the machine)':<28} {'dtype':<9} {'shape m x k x n':>20} {'GFLOP/s':>9}")
    for dtype, p in peaks.items():
        for key in ("peak", "model"):
            shape = " x ".join(map(str, p[f"{key}_shape"]))
            print(
                f"{'largest' if key == 'peak' else 'at the model shape':<28} {dtype:<9} {shape:>20} {p[key] / 1e9:9.1f}"
            )


def write_report(report: dict, results: list[Result], out_dir: Optional[str]) -> Path:
    """bench.json (everything) and bench.csv (the layer timings) in `out_dir` (default benchmarks/results/NOW)."""
    out = Path(out_dir or f"benchmarks/results/{datetime.now():%Y-%m-%d_%H-%M-%S}").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "bench.json", json.dumps(report, indent=2) + "\n")
    if not results:
        return out
    table = io.StringIO(newline="")
    counts = ("aten_ops", "kernels", "aten_ops_without_aux", "kernels_without_aux")
    writer = csv.DictWriter(table, fieldnames=[k for k in asdict(results[0]) if k != "extra"] + list(counts))
    writer.writeheader()
    for r in results:
        row = asdict(r)
        row.pop("extra")
        writer.writerow({**row, **{k: r.extra.get(k, "") for k in counts}})
    write_atomically(out / "bench.csv", table.getvalue())
    return out
