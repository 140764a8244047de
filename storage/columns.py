"""Column buffers: rows are appended as plain Python values on the hot path and turned
into Arrow columns in bulk (the hot path hands over; everything else is batched).

Levels arrive as Binance sends them, `[["price", "qty"], ...]` with decimal strings.
They are converted for many rows at once, one string->double cast per side. A batch that
fails the bulk conversion is checked row by row so that only the malformed rows are
dropped (never a row), and reported.

Spot's SBE streams send levels as integer mantissas with an exponent a message. Their text
is `decimal_text` (exact); the fast path (`packed_levels`) converts many rows' packed
mantissas at once, to the same doubles: a mantissa of at most 2^53 and a power of ten up
to 10^22 are exact doubles, and one IEEE division (or product) of the two rounds the exact
quotient to the nearest double, as parsing its decimal text does (tests/test_fastpath.py).
Anything beyond those bounds goes the text way.

The JSON fast path (`raw_levels`) never makes a Python object per level: it takes each side's
JSON text as msgspec left it (`msgspec.Raw`), proves in bulk that every row is a list of
["price", "qty"] string pairs, cuts the numbers out by their quotes (numpy) and lets
Arrow convert them, outside the GIL. The check: delete the characters a decimal number
may hold; a list of n pairs must then read exactly `[["",""],["",""],...]` (n times),
and an empty list exactly `[]`.
Anything else (whitespace, escapes, null, numbers not in strings, three-element levels)
fails it, and the batch goes the general way: orjson, then the row-by-row check. A
hypothesis test holds the two ways to the same rows, values and drops for any JSON.
"""
from __future__ import annotations

import logging
from itertools import compress
from typing import Any

import msgspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from storage.schemas import SCHEMAS, exchange_times_in_us

log = logging.getLogger(__name__)

_NUMBER_CHARS = b"0123456789.-+eE"  # all a decimal (or exponent) number is made of
_NOT_NUMBER = b'[]",|'  # what a checked row holds besides its numbers
_QUOTE = ord('"')


class _Skeletons(dict):
    """n -> a list of n string pairs with the number characters deleted: b'[["",""],...]'."""

    def __missing__(self, n: int) -> bytes:
        if n < 0:
            return b"\x00"  # matches no skeleton
        skeleton = b"[" + b",".join([b'["",""]'] * n) + b"]"
        if n <= 1024:
            self[n] = skeleton
        return skeleton


_SKELETONS = _Skeletons()
_PAIRS = pa.list_(pa.list_(pa.string()))
_PAIR_LENGTHS = {"min": 2, "max": 2}


def decimal_text(mantissa: int, exponent: int) -> str:
    """mantissa x 10^exponent, exactly, as decimal text ("123.45" for 12345, -2)."""
    if exponent >= 0:
        return str(mantissa * 10 ** exponent)
    digits = str(abs(mantissa)).rjust(1 - exponent, "0")
    return ("-" if mantissa < 0 else "") + digits[:exponent] + "." + digits[exponent:]


_LEVEL_BYTES = 16  # a packed level: price and qty mantissas, int64 little endian
_EXACT_MANTISSA = 2 ** 53
_POW10 = np.array([float(10 ** k) for k in range(23)])  # every one an exact double


def packed_levels(raws: list[bytes], exponents: list[int], column: int) -> pa.Array:
    """Column `column` (0 price, 1 qty) of one side of many rows, each row its levels as
    packed mantissas and `exponents[i]` its exponent -> list<double>. ValueError when a
    value is beyond the exact bounds (the caller then goes the text way)."""
    counts = np.fromiter(map(len, raws), np.int64, len(raws))
    if (counts % _LEVEL_BYTES).any():
        raise ValueError("a packed side is not whole levels")
    counts //= _LEVEL_BYTES
    offsets = np.zeros(len(raws) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    mantissas = np.frombuffer(b"".join(raws), "<i8").reshape(-1, 2)[:, column]
    if len(mantissas) and ((mantissas > _EXACT_MANTISSA) | (mantissas < -_EXACT_MANTISSA)).any():
        raise ValueError("a mantissa beyond 2^53")
    powers = np.repeat(np.asarray(exponents, np.int64), counts)
    if len(powers) and (np.abs(powers) > 22).any():
        raise ValueError("an exponent beyond 10^22")
    values = mantissas.astype(np.float64)
    scale = _POW10[np.abs(powers)]
    values = np.where(powers < 0, values / scale, values * scale)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float64()))


def unpacked_levels(raw: bytes, price_exponent: int, qty_exponent: int) -> list[list[str]]:
    """A packed side as the text levels `levels_to_arrow` takes (the exact way, for values
    beyond `packed_levels`' bounds)."""
    return [[decimal_text(p, price_exponent), decimal_text(q, qty_exponent)]
            for p, q in np.frombuffer(raw, "<i8").reshape(-1, 2).tolist()]


def levels_to_arrow(rows: list) -> tuple[pa.Array, pa.Array]:
    """[[["p","q"], ...], ...] -> (prices, sizes) as list<double> arrays.

    Raises ValueError (or an Arrow error) when any row is not a list of 2-string lists
    of decimal numbers.
    """
    # Arrow takes any sequence for a list, a string too: a "12" standing where a pair
    # should be would become the level ("1", "2").
    if any(type(side) is not list for side in rows) or any(type(p) is not list for side in rows for p in side):
        raise ValueError("a side or a level is not a list")
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


def raw_levels(raws: list) -> tuple[pa.Array, pa.Array]:
    """One side of many rows, each the JSON text of its level list -> (prices, sizes) as
    list<double> arrays. Raises ValueError (or an Arrow error) unless every row is a
    compact list of [price, qty] pairs of decimal strings; values are converted by the
    same Arrow cast as `levels_to_arrow`, so both give the same doubles."""
    if not raws:
        empty = pa.array([], pa.list_(pa.float64()))
        return empty, empty
    joined = b"|".join(raws)
    skeleton = joined.translate(None, _NUMBER_CHARS)
    counts = [(len(row) - 1) >> 3 for row in skeleton.split(b"|")]  # a list of n pairs: 8n+1 bytes
    if len(counts) != len(raws) or b"|".join(map(_SKELETONS.__getitem__, counts)) != skeleton:
        raise ValueError("levels are not compact lists of [price, qty] decimal strings")
    # The one valid JSON the check cannot see: a list of one bare number ("[0]" leaves "[]").
    # An empty row must be exactly "[]": the empty rows' bytes add up to 2 each.
    n, filled = len(raws), len(counts) - counts.count(0)
    rows_with_levels = b"|".join(compress(raws, counts))
    empty_bytes = len(joined) - (n - 1) - (len(rows_with_levels) - max(filled - 1, 0))
    if empty_bytes != 2 * (n - filled):
        raise ValueError("a level list holds a bare number")
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1]:
        # The check proved that quotes appear only around numbers: the k-th number lies
        # between quotes 2k and 2k+1. With everything but the numbers deleted, the numbers
        # are one string array (offsets from their lengths) for Arrow to cast.
        quotes = np.flatnonzero(np.frombuffer(rows_with_levels, np.uint8) == _QUOTE)
        if len(quotes) != 4 * offsets[-1]:
            raise ValueError("level count")
        ends = np.zeros(len(quotes) // 2 + 1, np.int32)
        np.cumsum(quotes[1::2] - quotes[0::2] - 1, out=ends[1:])
        digits = rows_with_levels.translate(None, _NOT_NUMBER)
        if ends[-1] != len(digits):
            raise ValueError("level text")
        numbers = pa.StringArray.from_buffers(len(ends) - 1, pa.py_buffer(ends), pa.py_buffer(digits))
        values = numbers.cast(pa.float64()).to_numpy()
    else:
        values = np.empty(0, np.float64)
    offsets = pa.array(offsets)
    return (pa.ListArray.from_arrays(offsets, pa.array(values[0::2])),
            pa.ListArray.from_arrays(offsets, pa.array(values[1::2])))


def _loads_levels(raw: bytes | msgspec.Raw) -> Any:
    """A side that failed `raw_levels`, as orjson reads it (None if it cannot), for the
    row-by-row check."""
    try:
        return orjson.loads(bytes(raw))
    except orjson.JSONDecodeError:
        return None


def levels_ok(levels: Any) -> bool:
    """The slow, exact check of one side of one message (used only after a bulk failure).
    Arrow's own string->double conversion is the judge, so that what passes here converts
    later: Python's float() also takes "1_000", " 1" and non-ASCII digits, which Arrow refuses."""
    try:
        levels_to_arrow([levels])
    except (ValueError, TypeError, pa.ArrowException):
        return False
    return True


class DepthColumns:
    """Rows of diff_orderbooks or partial_orderbooks (schema DEPTH).

    Three ways in, one table out, rows kept in arrival order:
    - `append_raw`: the fast path. Each side's levels are the JSON text msgspec found
      (`msgspec.Raw`, which points into the frame's bytes: nothing is copied); they are
      checked and converted in bulk by `raw_levels`.
    - `append`: levels as orjson made them, checked row by row only if the bulk
      conversion fails (the general path: recovery, frames msgspec refused).
    - `append_packed`: SBE's levels, packed mantissas and the message's exponents,
      converted in bulk by `packed_levels`.
    Whichever buffer is open is turned into an Arrow chunk when the other one is used,
    and when it holds `RAW_LIMIT` bytes of level text: memory stays bounded at any rate.
    """

    RAW_LIMIT = 1 << 20

    def __init__(self, kind: str):
        self.kind = kind
        self.schema = SCHEMAS[kind]
        self.chunks: list[pa.Table] = []
        self.chunk_rows = 0
        self.dropped: list[tuple] = []
        self._clear_rows()
        self._clear_raw()
        self._clear_packed()

    def _clear_packed(self) -> None:
        self.packed_rows: list[tuple] = []
        self.packed_bids: list[bytes] = []
        self.packed_asks: list[bytes] = []
        self.packed_exps: list[tuple[int, int]] = []  # (price, qty) exponents of each row
        self.packed_bytes = 0

    def _clear_rows(self) -> None:
        self.rows: list[tuple] = []        # the seven scalars of each row
        self.rbids: list = []
        self.rasks: list = []

    def _clear_raw(self) -> None:
        self.raw_rows: list[tuple] = []
        self.raw_bids: list = []
        self.raw_asks: list = []
        self.raw_bytes = 0

    def __len__(self) -> int:
        return len(self.rows) + len(self.raw_rows) + len(self.packed_rows) + self.chunk_rows

    def _only(self, way: str) -> None:
        """Rows stay in arrival order: the buffers of the other ways in become a chunk first."""
        if way != "rows" and self.rows:
            self._rows_to_chunk()
        if way != "raw" and self.raw_rows:
            self._raw_to_chunk()
        if way != "packed" and self.packed_rows:
            self._packed_to_chunk()

    def append(self, received: int, event: int | None, symbol: str, first: int | None, final: int, prev: int | None,
               ttime: int | None, bids: Any, asks: Any) -> None:
        self._only("rows")
        self.rows.append((received, event, symbol, first, final, prev, ttime))
        self.rbids.append(bids)
        self.rasks.append(asks)

    def append_raw(self, received: int, event: int | None, symbol: str, first: int | None, final: int,
                   prev: int | None, ttime: int | None, bids: bytes | msgspec.Raw, asks: bytes | msgspec.Raw) -> None:
        """`bids`, `asks`: the JSON text of each side's level list (bytes or msgspec.Raw)."""
        self._only("raw")
        self.raw_rows.append((received, event, symbol, first, final, prev, ttime))
        self.raw_bids.append(bids)
        self.raw_asks.append(asks)
        self.raw_bytes += len(bids) + len(asks)
        if self.raw_bytes > self.RAW_LIMIT:
            self._raw_to_chunk()

    def extend_raw(self, rows: list[tuple], bids: list, asks: list, nbytes: int) -> None:
        """`append_raw` of many rows at once (the processor's rows of one socket read):
        `rows` of the seven scalars, `nbytes` the length of their level text."""
        self._only("raw")
        self.raw_rows += rows
        self.raw_bids += bids
        self.raw_asks += asks
        self.raw_bytes += nbytes
        if self.raw_bytes > self.RAW_LIMIT:
            self._raw_to_chunk()

    def append_packed(self, received: int, event: int | None, symbol: str, first: int | None, final: int,
                      prev: int | None, ttime: int | None, bids: bytes, asks: bytes, price_exponent: int,
                      qty_exponent: int) -> None:
        """`bids`, `asks`: each side's levels as packed mantissas (`packed_levels`)."""
        self._only("packed")
        self.packed_rows.append((received, event, symbol, first, final, prev, ttime))
        self.packed_bids.append(bids)
        self.packed_asks.append(asks)
        self.packed_exps.append((price_exponent, qty_exponent))
        self.packed_bytes += len(bids) + len(asks)
        if self.packed_bytes > self.RAW_LIMIT:
            self._packed_to_chunk()

    def _packed_to_chunk(self) -> None:
        rows, bids, asks, exps = self.packed_rows, self.packed_bids, self.packed_asks, self.packed_exps
        self._clear_packed()
        p_exps, q_exps = [e[0] for e in exps], [e[1] for e in exps]
        try:
            levels = [packed_levels(bids, p_exps, 0), packed_levels(bids, q_exps, 1),
                      packed_levels(asks, p_exps, 0), packed_levels(asks, q_exps, 1)]
        except ValueError:  # beyond the exact bounds somewhere: the text way, row by row
            self._rows_to_chunk(rows, [unpacked_levels(b, *e) for b, e in zip(bids, exps, strict=True)],
                                [unpacked_levels(a, *e) for a, e in zip(asks, exps, strict=True)])
            return
        self._add_chunk(rows, levels)

    def take(self) -> tuple[pa.Table, list[tuple]]:
        """Return (table, dropped) and empty the buffer; dropped lists the scalar
        values of rows whose levels were malformed."""
        if self.rows:
            self._rows_to_chunk()
        if self.packed_rows:
            self._packed_to_chunk()
        if self.raw_rows or not self.chunks:
            self._raw_to_chunk()
        chunks, dropped = self.chunks, self.dropped
        self.chunks, self.chunk_rows, self.dropped = [], 0, []
        table = chunks[0] if len(chunks) == 1 else pa.concat_tables(chunks)
        return table, dropped

    def _add_chunk(self, rows: list[tuple], levels: list[pa.Array]) -> None:
        scalars = list(zip(*rows, strict=True)) if rows else [()] * 7
        arrays = [pa.array(col, type=self.schema.field(i).type) for i, col in enumerate(scalars)]
        # the exchange's times as sent (futures ms, spot µs) become µs here, a chunk at a time
        table = exchange_times_in_us(pa.Table.from_arrays(arrays + levels, schema=self.schema))
        self.chunks.append(table)
        self.chunk_rows += table.num_rows

    def _raw_to_chunk(self) -> None:
        rows, bids, asks = self.raw_rows, self.raw_bids, self.raw_asks
        self._clear_raw()
        try:
            levels = [*raw_levels(bids), *raw_levels(asks)]
        except (ValueError, pa.ArrowException):
            # not plain decimal strings in compact pairs somewhere: row by row
            self._rows_to_chunk(rows, [_loads_levels(r) for r in bids], [_loads_levels(r) for r in asks])
            return
        self._add_chunk(rows, levels)

    def _rows_to_chunk(self, rows: list[tuple] | None = None, bids: list | None = None, asks: list | None = None) -> None:
        if rows is None:
            rows, bids, asks = self.rows, self.rbids, self.rasks
            self._clear_rows()
        assert bids is not None and asks is not None
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


class SnapshotColumns:
    """Rows of orderbooks (one per REST snapshot). Each side arrives already converted,
    as (prices, sizes) one-row list<double> arrays (`raw_levels` or `levels_to_arrow` of
    [side]): a snapshot is checked when it arrives (a malformed one is fetched again),
    and held as 16 bytes a level rather than the Python lists of its parsed JSON."""

    def __init__(self) -> None:
        self.schema = SCHEMAS["orderbooks"]
        self.rows: list[tuple] = []

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, request_time: int, received_time: int, last_update_id: int, bids: tuple[pa.Array, pa.Array],
               asks: tuple[pa.Array, pa.Array], limit: int, symbol: str, event: int | None, ttime: int | None) -> None:
        self.rows.append((request_time, received_time, last_update_id, bids, asks, limit, symbol, event, ttime))

    def take(self) -> pa.Table:
        rows, self.rows = self.rows, []
        cols = list(zip(*rows, strict=True)) if rows else [()] * 9

        def side(values: tuple, i: int) -> pa.Array:
            return pa.concat_arrays([v[i] for v in values]) if values else pa.array([], pa.list_(pa.float64()))

        f = self.schema.field
        return exchange_times_in_us(pa.Table.from_arrays([
            pa.array(cols[0], f("request_time").type), pa.array(cols[1], f("received_time").type),
            pa.array(cols[2], f("lastUpdateId").type),
            side(cols[3], 0), side(cols[3], 1), side(cols[4], 0), side(cols[4], 1),
            pa.array(cols[5], f("limit").type), pa.array(cols[6], f("symbol").type),
            pa.array(cols[7], f("event_time").type), pa.array(cols[8], f("transaction_time").type),
        ], schema=self.schema))


class GapColumns:
    def __init__(self) -> None:
        self.schema = SCHEMAS["gaps"]
        self.rows: list[tuple] = []

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, detected_time: int, symbol: str, last_final: int | None, next_first: int | None, reason: str) -> None:
        self.rows.append((detected_time, symbol, last_final, next_first, reason))

    def take(self) -> pa.Table:
        rows, self.rows = self.rows, []
        cols = list(zip(*rows, strict=True)) if rows else [()] * 5
        return pa.Table.from_arrays(
            [pa.array(c, f.type) for c, f in zip(cols, self.schema, strict=True)], schema=self.schema)
