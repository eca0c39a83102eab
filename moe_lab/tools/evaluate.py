"""`moe-lab eval CKPT_OR_HF_DIR [data=...]`: language-modelling quality and routing of a model on some data.

The data are read, tokenised with the model's own tokenizer and packed into blocks exactly as training does
(`moe_lab/data`), and the held-out split is evaluated (the blocks a moe-lab run validated on, for the same data).
Reported, overall and per data domain: cross-entropy (nats per token), perplexity, and bits per byte (the
cross-entropy of a block over the UTF-8 bytes its target tokens decode to: comparable across tokenizers, as the
Pile and OLMo papers report it). Per MoE layer: the load of every expert, max/mean imbalance, the least loaded
expert's share of the fair load, dead and starved experts, dropped slots, and specialisation (I(expert; domain) /
H(domain)), the statistics training logs. Inference is dropless unless `--capacity checkpoint`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from moe_lab.analysis.stats import load_statistics, mutual_information
from moe_lab.analysis.trace import RoutingTrace
from moe_lab.model import MoETransformer
from moe_lab.training.routing_replay import check_trace_fits, tape_from_trace


@torch.no_grad()
def evaluate(
    model: MoETransformer, batches, tokenizer: Any, domain_names: list[str], replay: Optional[RoutingTrace] = None
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte per domain, and routing statistics per MoE layer, over `batches` (dicts of
    input_ids (B, S + 1), domain (B,), valid (B,), as the validation loader gives them); with `replay`, under the
    routing that trace recorded for each sequence, and how many of the model's own decisions it overrode."""
    model.eval()
    device = next(model.parameters()).device
    D = len(domain_names)
    nats_D, tokens_D, bytes_D = np.zeros(D), np.zeros(D), np.zeros(D)
    E = model.cfg.moe.num_experts
    layers = model.moe_layers
    slots_LE = np.zeros((len(layers), E))
    dropped_L = np.zeros(len(layers))
    domain_LED = np.zeros((len(layers), E, D))
    overridden_L = np.zeros(len(layers))
    experts_L, tokens_L = np.zeros(len(layers)), np.zeros(len(layers))
    for batch in batches:
        keep = batch["valid"].bool()
        ids_BS1 = batch["input_ids"][keep].to(device)
        domain_B = batch["domain"][keep]
        if len(ids_BS1) == 0:
            continue
        out = forward(model, ids_BS1[:, :-1], domain_B.to(device), replay)
        targets_BS = ids_BS1[:, 1:]
        B, S = targets_BS.shape
        loss_B = (
            F.cross_entropy(out.logits.float().flatten(0, 1), targets_BS.flatten(), reduction="none")
            .view(B, S)
            .sum(-1)
            .double()
            .cpu()
            .numpy()
        )
        for b in range(B):
            d = int(domain_B[b])
            nats_D[d] += loss_B[b]
            tokens_D[d] += S
            bytes_D[d] += len(tokenizer.decode(targets_BS[b].tolist()).encode("utf-8"))
        token_domain_T = domain_B.repeat_interleave(S).numpy()
        for i, layer in enumerate(layers):
            stats = out.moe[layer]
            E_l = stats.routing.num_experts  # this layer's experts (a pruned model's layers may differ)
            slots_LE[i, :E_l] += stats.tokens_per_expert_E.cpu().numpy()
            dropped_L[i] += float(stats.dropped_slots)
            experts = stats.expert_N.cpu().numpy()
            domains = token_domain_T[stats.token_N.cpu().numpy()]
            real = experts < E_l  # not the slots of no expert (top-p)
            np.add.at(domain_LED[i], (experts[real], domains[real]), 1)
            if stats.overridden_slots is not None:
                overridden_L[i] += float(stats.overridden_slots)
            experts_L[i] += float(stats.experts_per_token_T.sum())
            tokens_L[i] += stats.experts_per_token_T.numel()
    report = _report(domain_names, nats_D, tokens_D, bytes_D, layers, slots_LE, dropped_L, domain_LED)
    for i, entry in enumerate(report["layers"].values()):
        entry["experts_per_token"] = float(experts_L[i] / max(tokens_L[i], 1))
    if replay is not None:
        for i, entry in enumerate(report["layers"].values()):
            entry["overridden_frac"] = float(overridden_L[i] / max(slots_LE[i].sum(), 1))
        report["replay"] = {
            "trace": str(replay.path),
            "overridden_frac": float(overridden_L.sum() / max(slots_LE.sum(), 1)),
            "overridden_slots": int(overridden_L.sum()),
        }
    return report


def forward(model: MoETransformer, inputs_BS: torch.Tensor, domain_B: torch.Tensor, replay: Optional[RoutingTrace]):
    """The model's forward, routed live or, with a trace, as the trace recorded these sequences."""
    if replay is None:
        return model(inputs_BS, domain_B=domain_B)
    with model.replay_routing(tape_from_trace(replay, inputs_BS, model)):
        return model(inputs_BS, domain_B=domain_B)


def _report(domain_names, nats_D, tokens_D, bytes_D, layers, slots_LE, dropped_L, domain_LED) -> dict[str, Any]:
    def quality(nats: float, tokens: float, nbytes: float) -> dict[str, float]:
        loss = nats / max(tokens, 1)
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 700)),
            "bits_per_byte": nats / math.log(2) / max(nbytes, 1),
            "tokens": int(tokens),
            "bytes": int(nbytes),
        }

    report: dict[str, Any] = {
        "overall": quality(nats_D.sum(), tokens_D.sum(), bytes_D.sum()),
        "domains": {
            name: quality(nats_D[d], tokens_D[d], bytes_D[d]) for d, name in enumerate(domain_names) if tokens_D[d] > 0
        },
        "layers": {},
    }
    for i, layer in enumerate(layers):
        total = slots_LE[i].sum()
        entry = {
            "load": (slots_LE[i] / max(total, 1)).tolist(),
            **load_statistics(slots_LE[i]),
            "dropped_frac": float(dropped_L[i] / max(total, 1)),
        }
        if len(domain_names) > 1:
            entry["specialization"] = mutual_information(domain_LED[i])[1]
            entry["domain_counts"] = domain_LED[i].tolist()
        report["layers"][str(layer)] = entry
    if layers:
        entries = list(report["layers"].values())
        report["moe"] = {
            "mean_imbalance": float(np.mean([e["imbalance"] for e in entries])),
            "max_imbalance": float(np.max([e["imbalance"] for e in entries])),
            "min_load": float(np.min([e["min_load"] for e in entries])),
            "dead_experts": float(np.sum([e["dead_experts"] for e in entries])),
            "starved_experts": float(np.sum([e["starved_experts"] for e in entries])),
            "dropped_frac": float(np.mean([e["dropped_frac"] for e in entries])),
        }
        if all("specialization" in e for e in entries):
            report["moe"]["specialization"] = float(np.mean([e["specialization"] for e in entries]))
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = ["  domain        loss     ppl  bits/byte    tokens"]
    rows = [("all", report["overall"])] + list(report["domains"].items())
    for name, q in rows:
        lines.append(f"  {name:<10} {q['loss']:>7.4f} {q['ppl']:>7.2f} {q['bits_per_byte']:>10.4f} {q['tokens']:>9,}")
    if report["layers"]:
        special = all("specialization" in e for e in report["layers"].values())
        replayed = "replay" in report
        lines.append(
            "  layer  imbalance  min load  dropped  dead  starved  experts/token"
            + ("  specialization" if special else "")
            + ("  overridden" if replayed else "")
            + "  busiest expert"
        )
        for layer, e in report["layers"].items():
            top = int(np.argmax(e["load"]))
            lines.append(
                f"  {layer:>5}  {e['imbalance']:>9.2f}  {e['min_load']:>8.2f}  {e['dropped_frac']:>7.1%}  "
                f"{e['dead_experts']:>4.0f}  {e['starved_experts']:>7.0f}  {e['experts_per_token']:>13.2f}"
                + (f"  {e['specialization']:>14.3f}" if special else "")
                + (f"  {e['overridden_frac']:>10.1%}" if replayed else "")
                + f"  #{top} ({e['load'][top]:.1%})"
            )
    if "replay" in report:
        r = report["replay"]
        lines.append(
            f"  routed as {r['trace']} recorded: {r['overridden_slots']:,} of the model's own decisions overridden "
            f"({r['overridden_frac']:.1%})"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# The command


def run(args: Any, cfg: Any) -> int:
    """`moe-lab eval` with its parsed arguments (moe_lab/cli/commands.py) and its composed data settings `cfg`:
    the report printed, and written as JSON to --json."""
    import json
    import sys

    from moe_lab.tools.generate import load_for_inference

    model, tokenizer, described = load_for_inference(args.source, capacity=args.capacity)
    model = model.to(args.device)
    replay = None
    if args.replay is not None:  # read and checked against the model before any data
        replay = RoutingTrace(args.replay)
        check_trace_fits(replay, model, "--replay")
    run_cfg, data, loader = held_out_data(cfg, tokenizer, model.cfg, args.max_batches)
    print(
        f"moe-lab: evaluating {described} on {data.describe()}: {len(data.val_blocks)} held-out blocks of "
        f"{run_cfg.data.seq_len} tokens; {args.capacity}",
        file=sys.stderr,
        flush=True,
    )
    report = evaluate(model, loader, tokenizer, data.domain_names, replay)
    report = {"source": args.source, "data": data.describe(), "capacity": args.capacity, **report}
    print(format_report(report))
    if args.json is not None:
        from moe_lab.files import write_atomically

        write_atomically(args.json, json.dumps(report, indent=2) + "\n")
        print(f"moe-lab: wrote {args.json}", file=sys.stderr)
    return 0


def held_out_data(cfg: Any, tokenizer: Any, model_cfg: Any, max_batches: Optional[int]):
    """(run settings, data module, loader) of the held-out blocks of the composed data settings, tokenised with the
    model's own tokenizer; at most `max_batches` batches, evenly spaced (the blocks are grouped by domain). UserError,
    before any data is read, for blocks longer than the model's positions."""
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from moe_lab.data.config import TokenizerConfig
    from moe_lab.data.datamodule import LMDataModule, validation_batches
    from moe_lab.errors import UserError
    from moe_lab.training.schemas import validate

    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    cfg.paths.output_dir = "."  # these commands write no run directory
    run = validate(cfg)
    if run.data.seq_len > model_cfg.max_seq_len:
        raise UserError(
            f"data.seq_len={run.data.seq_len} is longer than the model's max_seq_len={model_cfg.max_seq_len}; "
            f"give data.seq_len={model_cfg.max_seq_len} (or less)"
        )
    vocab_size = model_cfg.vocab_size
    # The model's own tokenizer (end-of-text token included): the blocks are packed as its training packed them.
    tokenizer_cfg = (
        TokenizerConfig()
        if tokenizer.name == "bytes"
        else TokenizerConfig(name=tokenizer.name, eos_token=tokenizer.eos_token)
    )
    data = LMDataModule(run.data, tokenizer_cfg, run.paths.cache_dir, run.seed)
    data.prepare_data()
    data.setup("fit")
    if data.vocab_size > vocab_size:
        raise UserError(f"the tokenizer has {data.vocab_size} tokens but the model only {vocab_size}")
    batches = validation_batches(len(data.val_blocks), run.data.batch_size, 0, 1)
    if max_batches is not None and max_batches < len(batches):
        picked = np.unique(np.linspace(0, len(batches) - 1, max_batches).round().astype(int))
        batches = [batches[i] for i in picked]
    return run, data, DataLoader(data.val_blocks, batch_sampler=batches, collate_fn=lambda b: b, num_workers=0)
