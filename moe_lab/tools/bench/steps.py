"""Whole training steps timed: a model preset's optimizer step as `moe-lab train` takes it, and a whole dropless model
against the same weights exported to transformers."""

from __future__ import annotations

import contextlib
import statistics
from typing import Callable, Optional

import torch

from moe_lab.tools.bench import baseline as bench_baseline
from moe_lab.tools.bench.cases import median_ms


def compose_run(preset: str, overrides: list[str]):
    """The validated TrainConfig `moe-lab train model=PRESET OVERRIDES` runs, composed from conf/ (vocabulary of 320
    tokens, the embedded corpus's)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from moe_lab.training.schemas import config_dir, validate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={preset}"] + overrides + ["paths.output_dir=."])
    GlobalHydra.instance().clear()
    run = validate(cfg)
    run.model.vocab_size = 320
    return run


def compose_model(preset: str, overrides: list[str]):
    """The model config of a preset, composed from conf/ as `moe-lab train` does (vocabulary of 320 tokens)."""
    return compose_run(preset, overrides).model


# The learning rate of timed training steps: the default run's, so that routing moves from step to step as it does in
# training (on a CPU, a bfloat16 GEMM of a shape not seen before pays for a new kernel; a frozen routing hides that).
STEP_LR = 3e-3


def moe_lab_step(
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer,
    autocast: Optional[contextlib.AbstractContextManager] = None,
) -> Callable[[], None]:
    """One training step of a moe-lab model as `moe-lab train` takes it: loss plus the weighted aux losses,
    backward, optimizer step; under `autocast` if given."""
    autocast = autocast if autocast is not None else contextlib.nullcontext()

    def step():
        with autocast:
            out = model(inputs, targets)
            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_training_step(
    preset: str,
    experts: Optional[str],
    batch_size: int,
    seq_len: int,
    device: torch.device,
    precision: str,
    warmup: int,
    repeats: int,
) -> dict:
    """Tokens/s of forward + backward + AdamW for a model preset (config composed from conf/ as `moe-lab train`)."""
    from moe_lab.model import MoETransformer
    from moe_lab.training.metrics import peak_flops

    model_cfg = compose_model(preset, [f"experts={experts}"] if experts else [])
    torch.manual_seed(0)
    model = MoETransformer(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=STEP_LR, fused=device.type == "cuda")
    ids = torch.randint(0, 256, (batch_size, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    ms = median_ms(moe_lab_step(model, ids[:, :-1], ids[:, 1:], optimizer, autocast), device, warmup, repeats)
    tokens_per_sec = batch_size * seq_len / (ms / 1e3)
    flops = model.flops_per_token(seq_len)
    peak = peak_flops(device, "bf16-mixed" if precision == "bf16" else "32-true")
    params = model.num_params()
    return {
        "preset": preset + (f" experts={experts}" if experts else ""),
        "batch": batch_size,
        "seq_len": seq_len,
        "precision": precision,
        "step_ms": ms,
        "tokens_per_sec": tokens_per_sec,
        "params_total": params["total"],
        "params_active": params["active"],
        "flops_per_token": flops,
        "mfu": tokens_per_sec * flops / peak if peak else None,
        # The FFN GEMM at this model's own shape (tokens of a step, d_model, ffn_hidden), set against its FLOP/s.
        "gemm_shape": [batch_size * seq_len, model_cfg.d_model, model_cfg.ffn_hidden],
    }


def hf_step(
    hf,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer,
    autocast: Optional[contextlib.AbstractContextManager] = None,
) -> Callable[[], None]:
    """One training step of a transformers MoE: cross-entropy plus its own load-balancing loss, backward, AdamW."""
    import torch.nn.functional as F

    autocast = autocast if autocast is not None else contextlib.nullcontext()

    def step():
        with autocast:
            out = hf(input_ids=inputs)
            logits = out.logits.float().flatten(0, 1)
            loss = F.cross_entropy(logits, targets.flatten()) + out.aux_loss * hf.config.router_aux_loss_coef
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def exported_pair(preset: str, experts: Optional[str], device: torch.device):
    """(a dropless moe-lab model, its transformers export, the relative L2 error of their float32 logits)."""
    from moe_lab.interop.huggingface import to_hf
    from moe_lab.model import MoETransformer

    overrides = ([f"experts={experts}"] if experts else []) + [
        "model.moe.capacity_factor=null",
        "model.moe.eval_capacity_factor=null",
    ]
    torch.manual_seed(0)
    model = MoETransformer(compose_model(preset, overrides)).to(device)
    hf = to_hf(model, eos_id=0).to(device)
    hf.config.output_router_logits = True
    inputs = torch.randint(0, 256, (2, 64), device=device)
    with torch.no_grad():
        model.eval()
        ours = model(inputs).logits
        theirs = hf(input_ids=inputs).logits
    model.train()
    hf.train()
    return model, hf, ((ours - theirs).norm() / ours.norm()).item()


def whole_model_steps(model, hf, ids: torch.Tensor, device: torch.device, dtype: torch.dtype, compiled: bool):
    """{name: training step} of moe-lab's model and transformers', and with `compiled` a compiled copy of each (so
    that each is also compared at its fastest: both through torch.compile); each with its own AdamW at STEP_LR,
    under bf16 autocast when `dtype` is bfloat16."""
    import copy

    inputs, targets = ids[:, :-1], ids[:, 1:]
    models = {"moe-lab": model, "transformers": hf}
    if compiled:
        models["moe-lab compiled"] = copy.deepcopy(model)
        models["transformers compiled"] = copy.deepcopy(hf)
    steps = {}
    for name, module in models.items():
        optimizer = torch.optim.AdamW(module.parameters(), lr=STEP_LR, fused=device.type == "cuda")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        forward = torch.compile(module) if name.endswith("compiled") else module
        if name.startswith("transformers"):
            forward.config = module.config  # hf_step reads the aux-loss weight from it
            steps[name] = hf_step(forward, inputs, targets, optimizer, autocast)
        else:
            steps[name] = moe_lab_step(forward, inputs, targets, optimizer, autocast)
    return steps


def time_whole_model_vs_hf(
    preset: str,
    experts: Optional[str],
    batch_size: int,
    seq_len: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    dtype: torch.dtype = torch.float32,
    compiled: bool = False,
) -> dict:
    """A training step (forward, backward with the load-balancing loss, AdamW) of a dropless moe-lab model and of
    the same model exported to transformers (`to_hf`, the weights of `moe-lab export --format hf`, its default
    experts), both in float32 or both under bf16 autocast (float32 weights), timed in interleaved rounds; with
    `compiled`, moe-lab's step through torch.compile as well (its CPU default in bf16-mixed).

    Both compute the same logits (checked first in float32: relative L2 error, bar 1e-4); each adds its own
    load-balancing loss at the same weight (transformers' `load_balancing_loss_func` with output_router_logits;
    moe-lab's Switch loss and z-loss as configured)."""
    model, hf, error = exported_pair(preset, experts, device)
    if error > 1e-4:
        return {"preset": preset, "not_timed": f"the exported model computes other logits (relative error {error:.1e})"}
    ids = torch.randint(0, 256, (batch_size, seq_len + 1), device=device)
    steps = whole_model_steps(model, hf, ids, device, dtype, compiled)
    times = bench_baseline.interleaved_seconds(steps, device, warmup, repeats)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    out = {
        "preset": preset + (f" experts={experts}" if experts else "") + " dropless",
        "architecture": type(hf).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch_size,
        "seq_len": seq_len,
        "rounds": len(times["moe-lab"]),
        "logits_error": error,
        "moe_lab_ms": ms["moe-lab"],
        "transformers_ms": ms["transformers"],
        **bench_baseline.round_ratios(times["transformers"], times["moe-lab"]),
    }
    if compiled:
        out["moe_lab_compiled_ms"] = ms["moe-lab compiled"]
        out["transformers_compiled_ms"] = ms["transformers compiled"]
        out.update(bench_baseline.round_ratios(times["transformers"], times["moe-lab compiled"], "compiled_speedup"))
        out.update(
            bench_baseline.round_ratios(times["transformers compiled"], times["moe-lab compiled"], "both_compiled")
        )
    return out
