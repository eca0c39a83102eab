"""`moe-lab analyze CKPT [CKPT ...] [data=...]`: the routing analyses of `moe_lab/analysis/routing.py`, on any data.

The model runs over the held-out blocks of the data (packed as training packs them, with the model's tokenizer), in
batches, without gradients; each batch's routing decisions are added to count tables whose size does not depend on
the amount of data (`RoutingCounts`). With several checkpoints of one run, the last is analysed and each earlier one
is compared with it token by token (router saturation, OLMoE). Token-choice routers only: the analyses read each
token's top-k list, which expert-choice and soft routers do not have.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np
import torch

from moe_lab.analysis.routing import (RoutingCounts, coactivation, domain_shares, drops_by_position,
                                      layer_transitions, repeat_rates, saturation, vocab_specialisation)
from moe_lab.analysis.stats import mutual_information
from moe_lab.errors import UserError
from moe_lab.model import MoETransformer


def layer_choices(model: MoETransformer, out: Any, B: int, S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(experts, dropped, weights), each (L, B, S, K), of one forward: each token's top-k, first choice first."""
    experts, dropped, weights = [], [], []
    for layer, moe in zip(model.moe_layers, model.moe_modules()):
        stats = out.moe[layer]
        K = moe.top_k
        experts.append(stats.expert_N.view(K, B * S).T.reshape(B, S, K).cpu().numpy())
        weights.append(stats.weight_N.float().view(K, B * S).T.reshape(B, S, K).cpu().numpy())
        kept = stats.slot_kept_N()
        dropped.append(np.zeros((B, S, K), dtype=bool) if kept is None
                       else (~kept).view(K, B * S).T.reshape(B, S, K).cpu().numpy())
    return np.stack(experts), np.stack(dropped), np.stack(weights)


class TraceWriter:
    """`--trace FILE.parquet`: one row per token (sequence, position, token id, next token id, domain) and, per MoE
    layer, its experts (first choice first), their weights and which were dropped; written batch by batch (row
    groups), so memory stays bounded. pandas, polars and duckdb read it as is."""

    def __init__(self, path, layers: list[int], domain_names: list[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.layers, self.domain_names = pa, layers, domain_names
        fields = [pa.field("sequence", pa.int64()), pa.field("position", pa.int32()), pa.field("token", pa.int32()),
                  pa.field("next_token", pa.int32()), pa.field("domain", pa.string())]
        for layer in layers:
            fields += [pa.field(f"layer{layer}_experts", pa.list_(pa.int16())),
                       pa.field(f"layer{layer}_weights", pa.list_(pa.float32())),
                       pa.field(f"layer{layer}_dropped", pa.list_(pa.bool_()))]
        self.schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.sequences = 0

    def write(self, inputs_BS: np.ndarray, targets_BS: np.ndarray, domain_B: np.ndarray, experts_LBSK: np.ndarray,
              dropped_LBSK: np.ndarray, weights_LBSK: np.ndarray) -> None:
        pa = self.pa
        B, S = inputs_BS.shape
        K = experts_LBSK.shape[-1]
        columns = [pa.array(np.repeat(np.arange(self.sequences, self.sequences + B), S)),
                   pa.array(np.tile(np.arange(S, dtype=np.int32), B)),
                   pa.array(inputs_BS.reshape(-1).astype(np.int32)), pa.array(targets_BS.reshape(-1).astype(np.int32)),
                   pa.array([self.domain_names[d] for d in np.repeat(domain_B, S)])]
        offsets = pa.array(np.arange(0, B * S * K + 1, K, dtype=np.int32))
        for l in range(len(self.layers)):
            columns += [pa.ListArray.from_arrays(offsets, pa.array(experts_LBSK[l].reshape(-1).astype(np.int16))),
                        pa.ListArray.from_arrays(offsets, pa.array(weights_LBSK[l].reshape(-1).astype(np.float32))),
                        pa.ListArray.from_arrays(offsets, pa.array(dropped_LBSK[l].reshape(-1)))]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.sequences += B

    def close(self) -> None:
        self.writer.close()


def check_analysable(model: MoETransformer) -> None:
    if not model.moe_layers:
        raise UserError("the model is dense: there is no routing to analyse")
    for moe in model.moe_modules():
        if not moe.router.token_choice:
            raise UserError(f"router={moe.router.registered_name} gives no top-k list per token; moe-lab analyze "
                            "reads token-choice routers (topk, noisy_topk, switch, hash, sinkhorn, aux_free, soft, "
                            "hierarchical)")


@torch.no_grad()
def analyze(models: list[MoETransformer], batches: Iterable[dict], vocab_size: int, num_domains: int, seq_len: int,
            max_batches: Optional[int] = None, progress=None, trace: Optional[TraceWriter] = None) -> dict[str, Any]:
    """The analyses of the last model over `batches`, and the saturation of each earlier model against it."""
    final = models[-1]
    check_analysable(final)
    counts = RoutingCounts(len(final.moe_layers), final.cfg.moe.num_experts, final.moe_modules()[0].top_k,
                           vocab_size, num_domains, seq_len)
    agree = np.zeros((len(models) - 1, len(final.moe_layers), 2))
    tokens = 0
    for n, batch in enumerate(batches):
        if max_batches is not None and n >= max_batches:
            break
        keep = batch["valid"].bool()
        ids = batch["input_ids"][keep]
        if len(ids) == 0:
            continue
        inputs, targets = ids[:, :-1], ids[:, 1:]
        B, S = inputs.shape
        domain_B = batch["domain"][keep]
        experts, dropped, weights = layer_choices(final, final(inputs, domain_B=domain_B), B, S)
        counts.add(experts, inputs.numpy(), targets.numpy(), batch["domain"][keep].numpy(), dropped)
        if trace is not None:
            trace.write(inputs.numpy(), targets.numpy(), batch["domain"][keep].numpy(), experts, dropped, weights)
        for i, earlier in enumerate(models[:-1]):
            mine = layer_choices(earlier, earlier(inputs, domain_B=domain_B), B, S)[0]
            for l in range(len(final.moe_layers)):
                top1, topk = saturation(mine[l].reshape(B * S, -1), experts[l].reshape(B * S, -1))
                agree[i, l] += np.array([top1, topk]) * B * S
        tokens += B * S
        if progress is not None:
            progress(n + 1, tokens)
    if tokens == 0:
        raise UserError("no data to analyse")
    return {"counts": counts, "saturation": agree / tokens, "tokens": tokens}


def summary(result: dict[str, Any], domain_names: list[str], layers: list[int], decode=None, top_tokens: int = 5
            ) -> dict[str, Any]:
    """Plain data (JSON) of every analysis, per MoE layer."""
    counts: RoutingCounts = result["counts"]
    k, E = counts.top_k, counts.num_experts
    shares = domain_shares(counts)
    vocab_in, mean_in, favourite_in = vocab_specialisation(counts.input_LVE, k, min_count=5)
    vocab_next, mean_next, _ = vocab_specialisation(counts.next_LVE, k, min_count=5)
    co = coactivation(counts)
    follow = layer_transitions(counts)
    repeats = repeat_rates(counts)
    drops = drops_by_position(counts)
    out: dict[str, Any] = {"tokens": result["tokens"], "top_k": k, "num_experts": E, "uniform_share": k / E,
                           "domains": domain_names, "layers": {}}
    for l, layer in enumerate(layers):
        experts_tokens = {}
        for e in range(E):  # the tokens most specialised in expert e (seen at least 5 times)
            mine = np.flatnonzero((favourite_in[l] == e) & ~np.isnan(vocab_in[l]))
            best = mine[np.argsort(-vocab_in[l][mine], kind="stable")][:top_tokens]
            experts_tokens[str(e)] = [{"token": int(t), "text": decode([int(t)]) if decode else None,
                                       "share": float(vocab_in[l][t])} for t in best]
        out["layers"][str(layer)] = {
            "domain_shares": shares[l].tolist(), "domain_specialisation": mutual_information(counts.domain_LED[l])[1],
            "vocab_specialisation_input": float(mean_in[l]), "vocab_specialisation_next": float(mean_next[l]),
            "vocab_random_baseline": k / E, "expert_tokens": experts_tokens,
            "coactivation": co[l].tolist(),
            "next_layer_transitions": follow[l].tolist() if l < len(follow) else None,
            "repeat_top1": float(repeats["top1"][l]), "repeat_top1_chance": float(repeats["top1_chance"][l]),
            "repeat_topk": float(repeats["topk"][l]), "repeat_topk_chance": float(repeats["topk_chance"][l]),
            "drops_by_position": drops[l].tolist(),
            "saturation": [{"top1": float(s[l, 0]), "topk": float(s[l, 1])} for s in result["saturation"]],
        }
    return out


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"  {report['tokens']:,} tokens; top-{report['top_k']} of {report['num_experts']} experts "
             f"(random routing: vocabulary specialisation {report['uniform_share']:.3f})",
             "  layer  domain spec.  vocab spec. (in / next)  repeat top-1 (chance)  repeat top-k (chance)  "
             "drops first/last half" + ("  saturation top-1 / top-k" if any(
                 e["saturation"] for e in report["layers"].values()) else "")]
    for layer, e in report["layers"].items():
        drops = e["drops_by_position"]
        half = len(drops) // 2
        line = (f"  {layer:>5}  {e['domain_specialisation']:>12.3f}  {e['vocab_specialisation_input']:>11.3f} / "
                f"{e['vocab_specialisation_next']:<9.3f}  {e['repeat_top1']:>12.3f} ({e['repeat_top1_chance']:.3f})"
                f"  {e['repeat_topk']:>12.3f} ({e['repeat_topk_chance']:.3f})  "
                f"{np.mean(drops[:half]):>9.1%} / {np.mean(drops[half:]):.1%}")
        if e["saturation"]:
            line += "  " + ", ".join(f"{s['top1']:.2f} / {s['topk']:.2f}" for s in e["saturation"])
        lines.append(line)
    return "\n".join(lines)
