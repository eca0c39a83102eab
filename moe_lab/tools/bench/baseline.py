"""`moe-lab bench --baseline`: the default training step against the settings `moe-lab train` used before its fast
path (float32, eager, the same AdamW), timed in one process, interleaved, with the spread.

This machine's timings drift by 25% over minutes, so the two settings take turns: each round times a few steps of
each, and the ratio is taken per round, where the drift cancels. The median ratio is the speed-up; the lowest and
highest round ratios are its spread, so that a ratio of 1.2 can be told from noise. Both settings are built from the
config `moe-lab train` composes (the tiny model, its batch and sequence length, its optimizer and gradient clipping),
and the default one is what that config resolves to here (trainer.precision and compile, conf/trainer/auto.yaml).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

MIN_REPEATS = 5  # rounds; fewer cannot show a spread worth the name
STEPS_PER_ROUND = 4
BASELINE_TARGET = 1.6  # tokens/s of the default step over the float32 eager one (the bar; 2x the goal)


@dataclass(frozen=True)
class StepSettings:
    name: str
    precision: str  # Lightning's: "32-true" or "bf16-mixed"
    compile: bool
    fused_adamw: bool


def settings_here(run) -> list[StepSettings]:
    """The float32 eager step of before (AdamW fused on a GPU only), and the default `run` (a validated
    TrainConfig) resolves to here."""
    on_gpu = run.trainer.get("accelerator") in ("gpu", "cuda")
    before = StepSettings("float32 eager (before)", "32-true", False, on_gpu)
    default = StepSettings("default here", str(run.trainer["precision"]), bool(run.compile), bool(run.optim.fused))
    return [before, default]


def training_step(run, settings: StepSettings, device: torch.device) -> Callable[[], None]:
    """One optimizer step of `run`'s model as `moe-lab train` takes it: loss plus weighted aux losses, backward,
    gradient clipping at trainer.gradient_clip_val, AdamW with the run's settings (fused or not); under bf16
    autocast for bf16-mixed, through torch.compile when compiled."""
    from moe_lab.model import MoETransformer

    torch.manual_seed(run.seed)
    model = MoETransformer(run.model).to(device)
    forward = torch.compile(model) if settings.compile else model
    optim = run.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=settings.fused_adamw
    )
    ids = torch.randint(0, run.model.vocab_size, (run.data.batch_size, run.data.seq_len + 1), device=device)
    bf16 = settings.precision == "bf16-mixed"
    clip = run.trainer.get("gradient_clip_val")

    def step() -> None:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = forward(ids[:, :-1], ids[:, 1:])
            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's), so that a timing holds the work it times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(steps: dict[str, Callable[[], None]], device, warmup: int, repeats: int) -> dict:
    """{name: [seconds per step, one per round]}: every round times STEPS_PER_ROUND steps of each in turn."""
    for step in steps.values():
        for _ in range(max(warmup, 2)):  # compiling happens in the first calls
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(repeats, MIN_REPEATS)):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / STEPS_PER_ROUND)
    return times


def round_ratios(slower: list[float], faster: list[float], name: str = "speedup") -> dict[str, float]:
    """{name: median, name_low: lowest, name_high: highest} of the per-round time ratios slower / faster."""
    ratios = sorted(a / b for a, b in zip(slower, faster))
    return {name: statistics.median(ratios), f"{name}_low": ratios[0], f"{name}_high": ratios[-1]}


def compare(run, device: torch.device, warmup: int, repeats: int, peaks: dict) -> dict:
    """The baseline report: per setting tokens/s (median, lowest, highest round), achieved FLOP/s and its fraction
    of the measured bfloat16 GEMM at the model's shape; the per-round speed-up of the default over before."""
    from moe_lab.model import MoETransformer

    settings = settings_here(run)
    steps, first_step_s = {}, {}
    for s in settings:
        start = time.perf_counter()
        steps[s.name] = training_step(run, s, device)
        steps[s.name]()  # the first step compiles; its time is the start-up a run pays
        first_step_s[s.name] = time.perf_counter() - start
    times = interleaved_seconds(steps, device, warmup, repeats)
    tokens = run.data.batch_size * run.data.seq_len
    flops_per_token = MoETransformer(run.model).flops_per_token(run.data.seq_len)
    rows = []
    for s in settings:
        per_sec = sorted(tokens / t for t in times[s.name])
        median = statistics.median(per_sec)
        rows.append(
            {
                "settings": s.name,
                "precision": s.precision,
                "compile": s.compile,
                "fused_adamw": s.fused_adamw,
                "first_step_s": round(first_step_s[s.name], 2),
                "tokens_per_sec": median,
                "tokens_per_sec_low": per_sec[0],
                "tokens_per_sec_high": per_sec[-1],
                "achieved_flops": median * flops_per_token,
                "of_bf16_model_peak": median * flops_per_token / peaks["bfloat16"]["model"],
                "of_float32_model_peak": median * flops_per_token / peaks["float32"]["model"],
            }
        )
    speedup = round_ratios(*(times[s.name] for s in settings))
    return {
        "batch": run.data.batch_size,
        "seq_len": run.data.seq_len,
        "flops_per_token": flops_per_token,
        "rounds": len(times[settings[0].name]),
        "steps_per_round": STEPS_PER_ROUND,
        "settings": rows,
        **speedup,
        "target": BASELINE_TARGET,
        "met": speedup["speedup"] >= BASELINE_TARGET,
    }


def print_report(report: dict) -> None:
    print(
        f"\ntraining step, model tiny, batch {report['batch']} x {report['seq_len']}, {report['rounds']} interleaved "
        f"rounds of {report['steps_per_round']} steps"
    )
    print(
        f"{'settings':<24} {'precision':<11} {'compile':<8} {'fused':<6} {'tokens/s (low-high)':>24} "
        f"{'GFLOP/s':>8} {'of bf16 GEMM':>13} {'first step':>11}"
    )
    for r in report["settings"]:
        spread = f"{r['tokens_per_sec']:.0f} ({r['tokens_per_sec_low']:.0f}-{r['tokens_per_sec_high']:.0f})"
        print(
            f"{r['settings']:<24} {r['precision']:<11} {str(r['compile']):<8} {str(r['fused_adamw']):<6} {spread:>24} "
            f"{r['achieved_flops'] / 1e9:8.1f} {r['of_bf16_model_peak']:12.0%} {r['first_step_s']:10.1f}s"
        )
    verdict = "met" if report["met"] else "NOT MET"
    print(
        f"default / before: {report['speedup']:.2f}x (per round {report['speedup_low']:.2f}-"
        f"{report['speedup_high']:.2f}), target >= {report['target']}x: {verdict}"
    )
