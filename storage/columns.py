"""Column buffers: rows are appended as plain Python values on the hot path and turned
into Arrow columns in bulk (STYLE rule 5: batch everything else).

Levels arrive as Binance sends them, `[["price", "qty"], ...]` with decimal strings.
They are converted for many rows at once, one string->double cast per side. A batch that
fails the bulk conversion is checked row by row so that only the malformed rows are
dropped (SPEC rule 3), and reported.
"""
from __future__ import annotations

import logging
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.schemas import SCHEMAS

log = logging.getLogger(__name__)

_chain = chain.from_iterable
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
    """The slow, exact check of one side of one message (used only after a bulk failure).
    Arrow's own string->double conversion is the judge, so that what passes here converts
    later: Python's float() also takes "1_000", " 1" and non-ASCII digits, which Arrow refuses."""
    if not isinstance(levels, list):
        return False
    try:
        levels_to_arrow([levels])
    except (ValueError, TypeError, pa.ArrowException):
        return False
    return True


class DepthColumns:
    """Rows of diff_orderbooks or partial_orderbooks (schema DEPTH).

    Two ways in, one table out, rows kept in arrival order:
    - `append_pairs`: the fast path. Levels are lists of (price, qty) string pairs whose
      types msgspec already checked; they are flattened at once (the pairs are freed)
      and turned into columns in bulk: one string array, one cast to double, prices and
      sizes as the even and odd elements.
    - `append`: levels as orjson made them, checked row by row only if the bulk
      conversion fails (the general path: recovery, frames msgspec refused).
    Whichever buffer is open is turned into an Arrow chunk when the other one is used,
    and when it holds `FLAT_LIMIT` strings (Arrow holds a level in 16 bytes, a Python
    string in about 60): memory stays bounded at any message rate.
    """

    FLAT_LIMIT = 20_000

    def __init__(self, kind: str):
        self.kind = kind
        self.schema = SCHEMAS[kind]
        self.chunks: list[pa.Table] = []
        self.chunk_rows = 0
        self.dropped: list[tuple] = []
        self._clear_rows()
        self._clear_flat()

    def _clear_rows(self) -> None:
        self.rows: list[tuple] = []        # the seven scalars of each row
        self.rbids: list = []
        self.rasks: list = []

    def _clear_flat(self) -> None:
        self.frows: list[tuple] = []
        self.bflat: list[str] = []
        self.aflat: list[str] = []
        self.bn: list[int] = []
        self.an: list[int] = []

    def __len__(self) -> int:
        return len(self.rows) + len(self.frows) + self.chunk_rows

    def append(self, received, event, symbol, first, final, prev, ttime, bids, asks) -> None:
        if self.frows:
            self._flat_to_chunk()
        self.rows.append((received, event, symbol, first, final, prev, ttime))
        self.rbids.append(bids)
        self.rasks.append(asks)

    def append_pairs(self, received, event, symbol, first, final, prev, ttime,
                     bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> None:
        if self.rows:
            self._rows_to_chunk()
        self.frows.append((received, event, symbol, first, final, prev, ttime))
        self.bflat.extend(_chain(bids))
        self.aflat.extend(_chain(asks))
        self.bn.append(len(bids))
        self.an.append(len(asks))
        if len(self.bflat) + len(self.aflat) > self.FLAT_LIMIT:
            self._flat_to_chunk()

    def take(self) -> tuple[pa.Table, list[tuple]]:
        """Return (table, dropped) and empty the buffer; dropped lists the scalar
        values of rows whose levels were malformed."""
        if self.rows:
            self._rows_to_chunk()
        if self.frows or not self.chunks:
            self._flat_to_chunk()
        chunks, dropped = self.chunks, self.dropped
        self.chunks, self.chunk_rows, self.dropped = [], 0, []
        table = chunks[0] if len(chunks) == 1 else pa.concat_tables(chunks)
        return table, dropped

    def _add_chunk(self, rows: list[tuple], levels: list[pa.Array]) -> None:
        scalars = list(zip(*rows, strict=True)) if rows else [()] * 7
        arrays = [pa.array(col, type=self.schema.field(i).type) for i, col in enumerate(scalars)]
        table = pa.Table.from_arrays(arrays + levels, schema=self.schema)
        self.chunks.append(table)
        self.chunk_rows += table.num_rows

    def _flat_to_chunk(self) -> None:
        rows, bflat, aflat, bn, an = self.frows, self.bflat, self.aflat, self.bn, self.an
        self._clear_flat()
        try:
            levels = [*_flat_levels(bflat, bn), *_flat_levels(aflat, an)]
        except (ValueError, pa.ArrowException):
            # a price or size that is not a decimal number: back to pairs, row by row
            self._rows_to_chunk(rows, _unflatten(bflat, bn), _unflatten(aflat, an))
            return
        self._add_chunk(rows, levels)

    def _rows_to_chunk(self, rows: list[tuple] | None = None, bids: list | None = None, asks: list | None = None) -> None:
        if rows is None:
            rows, bids, asks = self.rows, self.rbids, self.rasks
            self._clear_rows()
        try:
            bid_p, bid_s = levels_to_arrow(bids)
            ask_p, ask_s = levels_to_arrow(asks)
        except (ValueError, TypeError, pa.ArrowException):
            keep = [i for i in range(len(rows)) if levels_ok(bids[i]) and levels_ok(asks[i])]
            kept = set(keep)
            self.dropped += [rows[i] for i in range(len(rows)) if i not in kept]
            rows, bids, asks = [rows[i] for i in keep], [bids[i] for i in keep], [asks[i] for i in keep]
            bid_p, bid_s = levels_to_arrow(bids)
            ask_p, ask_s = levels_to_arrow(asks)
        self._add_chunk(rows, [bid_p, bid_s, ask_p, ask_s])


def _flat_levels(flat: list[str], counts: list[int]) -> tuple[pa.Array, pa.Array]:
    """[p0, q0, p1, q1, ...] and the number of pairs per row -> (prices, sizes)."""
    values = pa.array(flat, pa.string()).cast(pa.float64()).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    offsets = pa.array(offsets)
    return (pa.ListArray.from_arrays(offsets, pa.array(values[0::2])),
            pa.ListArray.from_arrays(offsets, pa.array(values[1::2])))


def _unflatten(flat: list[str], counts: list[int]) -> list[list[list[str]]]:
    rows, pos = [], 0
    for n in counts:
        rows.append([[flat[pos + 2 * k], flat[pos + 2 * k + 1]] for k in range(n)])
        pos += 2 * n
    return rows


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
