"""The Arrow schemas of the output (docs/data.md), one per data kind, and each kind's sort order.

Every `*_time` column is µs since the epoch. Schema version 2 says so in every file's
key-value metadata (`schema_version = 2`); version-1 files (written before) hold the
exchange's times (`event_time`, `transaction_time`, the clock's `exchange_time`) in ms. `exchange_times_in_us` is
the one place where those become µs: every table read from disk, and every table built
from the exchange's messages (futures send ms, spot µs), goes through it.
"""
from __future__ import annotations

from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 2
_META = {b"schema_version": str(SCHEMA_VERSION).encode()}
EXCHANGE_TIMES = ("event_time", "transaction_time", "exchange_time")  # `clock` too
# A time in ms since the epoch stays below this until the year 5138; one in µs has been
# above it since 1973: which unit a value is in is never in doubt.
MS_BELOW = 10**14

LEVELS = pa.list_(pa.float64())

DEPTH = pa.schema([
    ("received_time", pa.int64()),
    ("event_time", pa.int64()),
    ("symbol", pa.string()),
    ("first_update_id", pa.int64()),
    ("final_update_id", pa.int64()),
    ("prev_final_update_id", pa.int64()),
    ("transaction_time", pa.int64()),
    ("bid_prices", LEVELS),
    ("bid_sizes", LEVELS),
    ("ask_prices", LEVELS),
    ("ask_sizes", LEVELS),
], metadata=_META)

SNAPSHOT = pa.schema([
    ("request_time", pa.int64()),
    ("received_time", pa.int64()),
    ("lastUpdateId", pa.int64()),
    ("bid_prices", LEVELS),
    ("bid_sizes", LEVELS),
    ("ask_prices", LEVELS),
    ("ask_sizes", LEVELS),
    ("limit", pa.int32()),
    ("symbol", pa.string()),
    ("event_time", pa.int64()),
    ("transaction_time", pa.int64()),
], metadata=_META)

GAP = pa.schema([
    ("detected_time", pa.int64()),
    ("symbol", pa.string()),
    ("last_final_update_id", pa.int64()),
    ("next_first_update_id", pa.int64()),
    ("reason", pa.string()),
], metadata=_META)

# one row per market a minute: how far the local stamps can be trusted (handlers/clock.py)
CLOCK = pa.schema([
    ("sample_time", pa.int64()),
    ("synced", pa.bool_()),
    ("max_error_us", pa.int64()),
    ("est_error_us", pa.int64()),
    ("exchange_time", pa.int64()),
    ("rtt_us", pa.int64()),
    ("offset_us", pa.int64()),
], metadata=_META)

# one row per market, UTC day and symbol: how whole the day's data is (storage/quality.py)
QUALITY = pa.schema([
    ("day", pa.string()),
    ("symbol", pa.string()),
    ("recorded_seconds", pa.float64()),
    ("covered_seconds", pa.float64()),
    ("coverage", pa.float64()),
    ("diffs", pa.int64()),
    ("partials", pa.int64()),
    ("snapshots", pa.int64()),
    ("gaps_sequence", pa.int64()),
    ("gaps_reconnect", pa.int64()),
    ("gaps_other", pa.int64()),
    ("restarts", pa.int64()),
    ("missing_update_ids", pa.int64()),
    ("verify_levels_compared", pa.int64()),
    ("verify_levels_agreed", pa.int64()),
    ("connections_lost", pa.int64()),
    ("diffs_from_one_copy", pa.int64()),
    ("clock_max_abs_offset_us", pa.int64()),
    ("clock_unsynced_seconds", pa.float64()),
    ("first_received_time", pa.int64()),
    ("last_received_time", pa.int64()),
], metadata=_META)

# the quality kind's part files while a day runs: what only the processor sees, per symbol,
# folded into the day's record when the day is compacted (storage/quality.py)
DELIVERY = pa.schema([
    ("time", pa.int64()),  # µs: the last event counted in the row (puts the row in its day)
    ("symbol", pa.string()),
    ("diffs_duplicated", pa.int64()),  # kept diffs that another connection delivered too
    ("connections_lost", pa.int64()),  # losses of connections carrying the symbol
], metadata=_META)

SCHEMAS: dict[str, pa.Schema] = {
    "diff_orderbooks": DEPTH,
    "partial_orderbooks": DEPTH,
    "orderbooks": SNAPSHOT,
    "gaps": GAP,
    "clock": CLOCK,
}

# Column that assigns a row to its UTC day, and the order of rows in a day file.
DAY_COLUMN = {
    "diff_orderbooks": "received_time",
    "partial_orderbooks": "received_time",
    "orderbooks": "received_time",
    "gaps": "detected_time",
    "clock": "sample_time",
    "quality": "time",  # its part files (DELIVERY); the day file is the record (QUALITY)
}
SORT_KEYS = {
    "diff_orderbooks": ["symbol", "received_time", "final_update_id"],
    "partial_orderbooks": ["symbol", "received_time", "final_update_id"],
    "orderbooks": ["symbol", "received_time"],
    "gaps": ["symbol", "detected_time"],
    "clock": ["sample_time"],
}


Data = TypeVar("Data", pa.Table, pa.RecordBatch)


def exchange_times_in_us(data: Data) -> Data:
    """`data` with its exchange times in µs (values in ms, from a version-1 file or from a
    message the exchange timed in ms, x 1000: exact) and the current schema version in its
    metadata. Tables without exchange times pass unchanged but for the metadata."""
    names = data.schema.names
    for name in EXCHANGE_TIMES:
        if name in names:
            i = names.index(name)
            col = data.column(i)
            fixed = pc.if_else(pc.less(col, MS_BELOW), pc.multiply(col, 1000), col)
            data = data.set_column(i, data.schema.field(i), fixed) if isinstance(data, pa.Table) else \
                pa.RecordBatch.from_arrays([fixed if j == i else c for j, c in enumerate(data.columns)],
                                           schema=data.schema)
    return data.replace_schema_metadata({**(data.schema.metadata or {}), **_META})
