"""Routing traces: every token's routing in one Parquet file, written by `moe-lab analyze --trace` and by training's
`routing.record`, read back for routing replay (`moe-lab eval --replay`, training's `routing.replay`).

One row per token: sequence, position, token id, next token id, domain, and per MoE layer L the columns
layer{L}_experts, layer{L}_weights and layer{L}_dropped: the token's experts, as many as it took (a fixed top-k
router: its k, first choice first; a router whose tokens take a varying number, top-p, null experts, ReLU, expert
choice: none, one or many, highest weight first). A router whose tokens take a varying number of its K routing
slots adds layer{L}_slots, the slot each expert filled, so that a replay fills the same ones. pandas, polars and
duckdb read it as is. A trace is data: reading it runs nothing it names.

For replay a trace is looked up by content: a sequence of the batch at hand is found by its token ids, wherever and
in whatever batch it was recorded, so a replay does not depend on batch sizes, data-parallel layout or the order
the sequences come in; a sequence the trace lacks is an error, never live routing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moe_lab.errors import UserError
from moe_lab.files import replace_with, temp_file_beside


class TraceMismatch(UserError):
    """A trace that cannot be replayed on this model or these tokens."""


class TraceWriter:
    """Writes a trace batch by batch (row groups), so memory stays bounded; into a temporary file beside `path` that
    `close` puts in place (a trace cut short never takes the name)."""

    def __init__(
        self, path: str | Path, layers: list[int], domain_names: list[str], num_experts: int, slots: bool = False
    ):
        """`num_experts` (E) is the expert id that pads a token's list in `write` (no expert); `slots`: write each
        expert's routing slot (layer{L}_slots)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.layers, self.domain_names = pa, layers, domain_names
        self.num_experts, self.slots = num_experts, slots
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
            if slots:
                fields.append(pa.field(f"layer{layer}_slots", pa.list_(pa.int16())))
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
        slots_LBSK: Optional[np.ndarray] = None,
    ) -> None:
        """One batch: each token's experts (L, B, S, K), padded with expert E where a token took fewer than K, and
        with them their drops, weights and (for `slots`) routing slots."""
        pa = self.pa
        B, S = inputs_BS.shape
        columns = [
            pa.array(np.repeat(np.arange(self.sequences, self.sequences + B), S)),
            pa.array(np.tile(np.arange(S, dtype=np.int32), B)),
            pa.array(inputs_BS.reshape(-1).astype(np.int32)),
            pa.array(targets_BS.reshape(-1).astype(np.int32)),
            pa.array([self.domain_names[d] for d in np.repeat(domain_B, S)]),
        ]
        for l in range(len(self.layers)):
            real_TK = experts_LBSK[l].reshape(B * S, -1) < self.num_experts
            offsets = pa.array(np.r_[0, np.cumsum(real_TK.sum(1))].astype(np.int32))

            parts = [(experts_LBSK, np.int16), (weights_LBSK, np.float32), (dropped_LBSK, bool)]
            if self.slots:
                if slots_LBSK is None:
                    raise ValueError("this trace lists routing slots: write needs slots_LBSK")
                parts.append((slots_LBSK, np.int16))
            for values_LBSK, dtype in parts:
                values = values_LBSK[l].reshape(B * S, -1)[real_TK].astype(dtype)
                columns.append(pa.ListArray.from_arrays(offsets, pa.array(values)))
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


@dataclass(frozen=True)
class TokenLists:
    """One layer's experts for R tokens: token r took experts[starts[r]:starts[r] + lengths[r]] (int64), each in the
    routing slot `slots[...]` where the trace records slots (else None)."""

    lengths_R: np.ndarray
    experts: np.ndarray
    slots: Optional[np.ndarray]

    def padded(self, width: int, fill: int) -> np.ndarray:
        """(R, width): each token's experts at their slots (without slots: first to last), `fill` elsewhere."""
        R = len(self.lengths_R)
        token = np.repeat(np.arange(R), self.lengths_R)
        rank = np.arange(len(token)) - np.repeat(np.cumsum(self.lengths_R) - self.lengths_R, self.lengths_R)
        slot = rank if self.slots is None else self.slots
        if len(np.unique(token * width + slot)) != len(token):
            raise TraceMismatch("a token of this trace lists two experts in one routing slot")
        out = np.full((R, width), fill, dtype=np.int64)
        out[token, slot] = self.experts
        return out


class RoutingTrace:
    """A trace read for replay: each recorded sequence's experts in every layer, found by its token ids."""

    def __init__(self, path: str | Path):
        import pyarrow as pa

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
        table = table.take(pa.array(order))  # rows sorted by (sequence, position)
        sequence, position = sequence[order], position[order]
        tokens = table["token"].to_numpy().astype(np.int32)
        # layer -> (offsets (rows + 1,), experts, slots or None): each row's list is experts[offsets[r]:offsets[r+1]]
        self.lists: dict[int, tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = {}
        for layer in self.layers:
            offsets, experts = _lists(table, f"layer{layer}_experts", self.path)
            slots = None
            if f"layer{layer}_slots" in names:
                slot_offsets, slots = _lists(table, f"layer{layer}_slots", self.path)
                if not np.array_equal(slot_offsets, offsets):
                    raise UserError(f"{self.path}: layer {layer}'s slots do not match its experts, token by token")
            self.lists[layer] = (offsets, experts, slots)
        starts = np.flatnonzero(np.r_[True, sequence[1:] != sequence[:-1]])
        ends = np.r_[starts[1:], len(sequence)]
        self.index: dict[bytes, int] = {}  # a sequence's token ids -> its first row
        for start, end in zip(starts.tolist(), ends.tolist()):
            if not np.array_equal(position[start:end], np.arange(end - start)):
                raise UserError(f"{self.path}: sequence {sequence[start]} does not hold positions 0..{end - start - 1}")
            self.index.setdefault(tokens[start:end].tobytes(), start)
        self.num_sequences = len(starts)

    def experts_per_token(self, layer: int) -> tuple[int, int]:
        """The fewest and the most experts a token of `layer` took in this trace."""
        lengths = np.diff(self.lists[layer][0])
        return (int(lengths.min()), int(lengths.max())) if len(lengths) else (0, 0)

    def check_model(
        self, layers: list[int], num_experts: dict[int, int], lists: dict[int, tuple[int, int]], setting: str
    ) -> None:
        """TraceMismatch unless the trace routes every MoE layer of a model whose layer L has num_experts[L] experts
        and lists between lists[L] = (fewest, most) experts per token; `setting` (the option that named the trace)
        begins the message."""
        where = f"{setting}={self.path}"
        missing = [l for l in layers if l not in self.lists]
        if missing:
            raise TraceMismatch(
                f"{where} records the MoE layers {self.layers}; the model's are {layers} (none for {missing})"
            )
        for layer in layers:
            (low, high), (fewest, most) = self.experts_per_token(layer), lists[layer]
            if low < fewest or high > most:
                wanted = f"k={most}" if fewest == most else f"{fewest} to {most}"
                raise TraceMismatch(
                    f"{where} gives {low if low == high else f'{low} to {high}'} experts per token in layer "
                    f"{layer}; the model's router takes {wanted}"
                )
            experts = self.lists[layer][1]
            largest = int(experts.max(initial=-1))
            if largest >= num_experts[layer] or int(experts.min(initial=0)) < 0:
                raise TraceMismatch(
                    f"{where} names expert {largest} in layer {layer}; the model has {num_experts[layer]} experts"
                    + ("" if len(set(num_experts.values())) == 1 else " there")
                )
            slots = self.lists[layer][2]
            if slots is not None and len(slots) and (slots.min() < 0 or slots.max() >= most):
                raise TraceMismatch(f"{where} names routing slot {int(slots.max())} in layer {layer}; it has {most}")

    def experts_of(self, tokens_BS: np.ndarray, layers: list[int]) -> dict[int, TokenLists]:
        """Each layer's recorded experts for the B * S tokens of these sequences (batch-major), found by their
        token ids."""
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
        return {layer: _taken(*self.lists[layer], take) for layer in layers}


def _taken(offsets: np.ndarray, experts: np.ndarray, slots: Optional[np.ndarray], rows: np.ndarray) -> TokenLists:
    """The lists of `rows`, in that order."""
    lengths = offsets[rows + 1] - offsets[rows]
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    at = np.repeat(offsets[rows], lengths) + within
    return TokenLists(lengths, experts[at], None if slots is None else slots[at])


def _read(path: Path) -> Any:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"{path}: no such routing trace (moe-lab analyze --trace FILE.parquet writes one)")
    try:
        return pq.read_table(str(path))
    except Exception as e:  # pyarrow's ArrowInvalid and OSError for a file that is not Parquet or is damaged
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be read as a Parquet routing trace ({first})") from None


def _lists(table: Any, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A list column of integers as (offsets (rows + 1,), values int64)."""
    import pyarrow as pa

    column = table[name]
    if not pa.types.is_list(column.type) or not pa.types.is_integer(column.type.value_type) or column.null_count:
        raise UserError(f"{path}: column {name} is not a list of expert ids per token ({column.type})")
    lists = column.combine_chunks()
    if isinstance(lists, pa.ChunkedArray):  # an empty table
        lists = pa.array([], type=column.type)
    if lists.values.null_count:
        raise UserError(f"{path}: column {name} holds missing expert ids")
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]
