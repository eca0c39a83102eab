"""Routing traces: every token's routing in one Parquet file, written by `moe-lab analyze --trace` and by training's
`routing.record`, read back for routing replay (`moe-lab eval --replay`, training's `routing.replay`).

One row per token: sequence, position, token id, next token id, domain, and per MoE layer L the columns
layer{L}_experts (first choice first), layer{L}_weights and layer{L}_dropped. pandas, polars and duckdb read it as
is. A trace is data: reading it runs nothing it names.

For replay a trace is looked up by content: a sequence of the batch at hand is found by its token ids, wherever and
in whatever batch it was recorded, so a replay does not depend on batch sizes, data-parallel layout or the order
the sequences come in; a sequence the trace lacks is an error, never live routing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from moe_lab.errors import UserError
from moe_lab.files import replace_with, temp_file_beside


class TraceMismatch(UserError):
    """A trace that cannot be replayed on this model or these tokens."""


class TraceWriter:
    """Writes a trace batch by batch (row groups), so memory stays bounded; into a temporary file beside `path` that
    `close` puts in place (a trace cut short never takes the name)."""

    def __init__(self, path: str | Path, layers: list[int], domain_names: list[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.layers, self.domain_names = pa, layers, domain_names
        fields = [
            pa.field("sequence", pa.int64()),
            pa.field("position", pa.int32()),
            pa.field("token", pa.int32()),
            pa.field("next_token", pa.int32()),
            pa.field("domain", pa.string()),
        ]
        for layer in layers:
            fields += [
                pa.field(f"layer{layer}_experts", pa.list_(pa.int16())),
                pa.field(f"layer{layer}_weights", pa.list_(pa.float32())),
                pa.field(f"layer{layer}_dropped", pa.list_(pa.bool_())),
            ]
        self.schema = pa.schema(fields)
        self.path = Path(path)
        self.tmp = temp_file_beside(self.path)
        self.writer = pq.ParquetWriter(str(self.tmp), self.schema)
        self.sequences = 0

    def write(
        self,
        inputs_BS: np.ndarray,
        targets_BS: np.ndarray,
        domain_B: np.ndarray,
        experts_LBSK: np.ndarray,
        dropped_LBSK: np.ndarray,
        weights_LBSK: np.ndarray,
    ) -> None:
        pa = self.pa
        B, S = inputs_BS.shape
        K = experts_LBSK.shape[-1]
        columns = [
            pa.array(np.repeat(np.arange(self.sequences, self.sequences + B), S)),
            pa.array(np.tile(np.arange(S, dtype=np.int32), B)),
            pa.array(inputs_BS.reshape(-1).astype(np.int32)),
            pa.array(targets_BS.reshape(-1).astype(np.int32)),
            pa.array([self.domain_names[d] for d in np.repeat(domain_B, S)]),
        ]
        offsets = pa.array(np.arange(0, B * S * K + 1, K, dtype=np.int32))
        for l in range(len(self.layers)):
            columns += [
                pa.ListArray.from_arrays(offsets, pa.array(experts_LBSK[l].reshape(-1).astype(np.int16))),
                pa.ListArray.from_arrays(offsets, pa.array(weights_LBSK[l].reshape(-1).astype(np.float32))),
                pa.ListArray.from_arrays(offsets, pa.array(dropped_LBSK[l].reshape(-1))),
            ]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.sequences += B

    def close(self) -> None:
        self.writer.close()
        replace_with(self.tmp, self.path)

    def abandon(self) -> None:
        """Leave no file: the trace was cut short."""
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


_LAYER = re.compile(r"^layer(\d+)_experts$")


class RoutingTrace:
    """A trace read for replay: each recorded sequence's experts in every layer, found by its token ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        table = _read(self.path)
        names = set(table.column_names)
        self.layers = sorted(int(m.group(1)) for n in names if (m := _LAYER.match(n)))
        if not {"sequence", "position", "token"} <= names or not self.layers:
            raise UserError(
                f"{self.path} is not a routing trace (it needs the columns sequence, position, token and "
                "layer{L}_experts that moe-lab analyze --trace writes)"
            )
        sequence = table["sequence"].to_numpy()
        position = table["position"].to_numpy()
        order = np.lexsort((position, sequence))
        sequence, position = sequence[order], position[order]
        tokens = table["token"].to_numpy()[order].astype(np.int32)
        self.experts: dict[int, np.ndarray] = {}  # layer -> (rows, K), rows sorted by (sequence, position)
        for layer in self.layers:
            self.experts[layer] = _fixed_lists(table[f"layer{layer}_experts"], self.path, layer)[order]
        self.top_k = {layer: experts.shape[1] for layer, experts in self.experts.items()}
        starts = np.flatnonzero(np.r_[True, sequence[1:] != sequence[:-1]])
        ends = np.r_[starts[1:], len(sequence)]
        self.index: dict[bytes, int] = {}  # a sequence's token ids -> its first row
        for start, end in zip(starts.tolist(), ends.tolist()):
            if not np.array_equal(position[start:end], np.arange(end - start)):
                raise UserError(f"{self.path}: sequence {sequence[start]} does not hold positions 0..{end - start - 1}")
            self.index.setdefault(tokens[start:end].tobytes(), start)
        self.num_sequences = len(starts)

    def check_model(self, layers: list[int], num_experts: int, top_k: dict[int, int], setting: str) -> None:
        """TraceMismatch unless the trace routes every MoE layer of a model of `num_experts` experts with its k;
        `setting` (the option that named the trace) begins the message."""
        where = f"{setting}={self.path}"
        missing = [l for l in layers if l not in self.experts]
        if missing:
            raise TraceMismatch(
                f"{where} records the MoE layers {self.layers}; the model's are {layers} (none for {missing})"
            )
        for layer in layers:
            if self.top_k[layer] != top_k[layer]:
                raise TraceMismatch(
                    f"{where} gives {self.top_k[layer]} experts per token in layer {layer}; the model's router "
                    f"takes k={top_k[layer]}"
                )
            largest = int(self.experts[layer].max(initial=-1))
            if largest >= num_experts:
                raise TraceMismatch(
                    f"{where} names expert {largest} in layer {layer}; the model has {num_experts} experts"
                )

    def experts_of(self, tokens_BS: np.ndarray, layers: list[int]) -> dict[int, np.ndarray]:
        """Each layer's recorded experts (B, S, K) for these sequences, found by their token ids."""
        tokens_BS = np.ascontiguousarray(tokens_BS, dtype=np.int32)
        B, S = tokens_BS.shape
        rows = [self.index.get(row.tobytes()) for row in tokens_BS]
        missing = sum(r is None for r in rows)
        if missing:
            raise TraceMismatch(
                f"{missing} of the {B} sequences of this batch are not in {self.path} ({self.num_sequences} "
                "sequences recorded); a replay needs the routing of every sequence it runs on: record it on "
                "the same data (moe-lab analyze --trace, or training's routing.record)"
            )
        take = (np.asarray(rows)[:, None] + np.arange(S)[None, :]).reshape(-1)
        return {layer: self.experts[layer][take].reshape(B, S, -1) for layer in layers}


def _read(path: Path) -> Any:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"{path}: no such routing trace (moe-lab analyze --trace FILE.parquet writes one)")
    try:
        return pq.read_table(str(path))
    except Exception as e:  # pyarrow's ArrowInvalid and OSError for a file that is not Parquet or is damaged
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be read as a Parquet routing trace ({first})") from None


def _fixed_lists(column: Any, path: Path, layer: int) -> np.ndarray:
    """A list column of equal-length lists as a (rows, K) int64 array."""
    import pyarrow as pa

    lists = column.combine_chunks()
    if isinstance(lists, pa.ChunkedArray):  # an empty table
        lists = pa.array([], type=column.type)
    lengths = np.diff(lists.offsets.to_numpy())
    if len(lengths) and (lengths.min() != lengths.max() or lengths.min() == 0):
        raise UserError(
            f"{path}: layer {layer} gives {lengths.min()} to {lengths.max()} experts per token; replay takes a "
            "fixed k per token"
        )
    k = int(lengths[0]) if len(lengths) else 0
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return values.reshape(-1, max(k, 1)) if k else values.reshape(0, 1)
