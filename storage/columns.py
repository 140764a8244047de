"""Column buffers: rows are appended as plain Python values on the hot path and turned
into an Arrow table in bulk, once per flush (STYLE rule 5: batch everything else).

Levels arrive as Binance sends them, `[["price", "qty"], ...]` with decimal strings.
They are converted for a whole batch at once: one `pa.array` of the nested lists, one
string->double cast per side. A batch that fails the bulk conversion is checked row by
row so that only the malformed rows are dropped (SPEC rule 3), and reported.
"""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from storage.schemas import SCHEMAS

log = logging.getLogger(__name__)

_PAIRS = pa.list_(pa.list_(pa.string()))
_PAIR_LENGTHS = {"min": 2, "max": 2}


def levels_to_arrow(rows: list) -> tuple[pa.Array, pa.Array]:
    """[[["p","q"], ...], ...] -> (prices, sizes) as list<double> arrays.

    Raises ValueError (or an Arrow error) when any row is not a list of 2-string lists
    of decimal numbers.
    """
    nested = pa.array(rows, type=_PAIRS)
    if nested.null_count:
        raise ValueError("null level list")
    pairs = nested.flatten()
    if len(pairs) and (pairs.null_count or pc.min_max(pairs.value_lengths()).as_py() != _PAIR_LENGTHS):
        raise ValueError("a level is not a [price, qty] pair")
    prices = pc.list_element(pairs, 0).cast(pa.float64())
    sizes = pc.list_element(pairs, 1).cast(pa.float64())
    offsets = nested.offsets
    return pa.ListArray.from_arrays(offsets, prices), pa.ListArray.from_arrays(offsets, sizes)


def levels_ok(levels) -> bool:
    """The slow, exact check of one side of one message (used only after a bulk failure)."""
    if not isinstance(levels, list):
        return False
    try:
        for pair in levels:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], str)):
                return False
            float(pair[0]), float(pair[1])
    except (TypeError, ValueError):
        return False
    return True


class DepthColumns:
    """Rows of diff_orderbooks or partial_orderbooks (schema DEPTH)."""

    _SCALARS = ("received_time", "event_time", "symbol", "first_update_id",
                "final_update_id", "prev_final_update_id", "transaction_time")

    def __init__(self, kind: str):
        self.kind = kind
        self.schema = SCHEMAS[kind]
        self._clear()

    def _clear(self) -> None:
        self.cols: tuple[list, ...] = tuple([] for _ in range(9))

    def __len__(self) -> int:
        return len(self.cols[0])

    def append(self, received, event, symbol, first, final, prev, ttime, bids, asks) -> None:
        c = self.cols
        c[0].append(received)
        c[1].append(event)
        c[2].append(symbol)
        c[3].append(first)
        c[4].append(final)
        c[5].append(prev)
        c[6].append(ttime)
        c[7].append(bids)
        c[8].append(asks)

    def take(self) -> tuple[pa.Table, list[tuple]]:
        """Return (table, dropped) and empty the buffer; dropped lists the scalar
        values of rows whose levels were malformed."""
        cols, dropped = self.cols, []
        self._clear()
        try:
            bid_p, bid_s = levels_to_arrow(cols[7])
            ask_p, ask_s = levels_to_arrow(cols[8])
        except (ValueError, TypeError, pa.ArrowException):
            keep = [i for i in range(len(cols[0])) if levels_ok(cols[7][i]) and levels_ok(cols[8][i])]
            kept = set(keep)
            dropped = [tuple(col[i] for col in cols[:7]) for i in range(len(cols[0])) if i not in kept]
            cols = tuple([col[i] for i in keep] for col in cols)
            bid_p, bid_s = levels_to_arrow(cols[7])
            ask_p, ask_s = levels_to_arrow(cols[8])
        arrays = [pa.array(col, type=self.schema.field(i).type) for i, col in enumerate(cols[:7])]
        return pa.Table.from_arrays(arrays + [bid_p, bid_s, ask_p, ask_s], schema=self.schema), dropped


class SnapshotColumns:
    """Rows of orderbooks (one per REST snapshot)."""

    def __init__(self):
        self.schema = SCHEMAS["orderbooks"]
        self.rows: list[tuple] = []

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, request_time, received_time, last_update_id, bids, asks, limit, symbol, event, ttime):
        self.rows.append((request_time, received_time, last_update_id, bids, asks, limit, symbol, event, ttime))

    def take(self) -> pa.Table:
        rows, self.rows = self.rows, []
        cols = list(zip(*rows, strict=True)) if rows else [()] * 9
        bid_p, bid_s = levels_to_arrow(list(cols[3]))
        ask_p, ask_s = levels_to_arrow(list(cols[4]))
        f = self.schema.field
        return pa.Table.from_arrays([
            pa.array(cols[0], f("request_time").type), pa.array(cols[1], f("received_time").type),
            pa.array(cols[2], f("lastUpdateId").type), bid_p, bid_s, ask_p, ask_s,
            pa.array(cols[5], f("limit").type), pa.array(cols[6], f("symbol").type),
            pa.array(cols[7], f("event_time").type), pa.array(cols[8], f("transaction_time").type),
        ], schema=self.schema)


class GapColumns:
    def __init__(self):
        self.schema = SCHEMAS["gaps"]
        self.rows: list[tuple] = []

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, detected_time, symbol, last_final, next_first, reason) -> None:
        self.rows.append((detected_time, symbol, last_final, next_first, reason))

    def take(self) -> pa.Table:
        rows, self.rows = self.rows, []
        cols = list(zip(*rows, strict=True)) if rows else [()] * 5
        return pa.Table.from_arrays(
            [pa.array(c, f.type) for c, f in zip(cols, self.schema, strict=True)], schema=self.schema)
