"""The Arrow schemas of the output (docs/data.md), one per data kind, and each kind's sort order."""
from __future__ import annotations

import pyarrow as pa

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
])

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
])

GAP = pa.schema([
    ("detected_time", pa.int64()),
    ("symbol", pa.string()),
    ("last_final_update_id", pa.int64()),
    ("next_first_update_id", pa.int64()),
    ("reason", pa.string()),
])

# one row per market a minute: how far the local stamps can be trusted (handlers/clock.py)
CLOCK = pa.schema([
    ("sample_time", pa.int64()),
    ("synced", pa.bool_()),
    ("max_error_us", pa.int64()),
    ("est_error_us", pa.int64()),
    ("exchange_time", pa.int64()),
    ("rtt_us", pa.int64()),
    ("offset_us", pa.int64()),
])

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
}
SORT_KEYS = {
    "diff_orderbooks": ["symbol", "received_time", "final_update_id"],
    "partial_orderbooks": ["symbol", "received_time", "final_update_id"],
    "orderbooks": ["symbol", "received_time"],
    "gaps": ["symbol", "detected_time"],
    "clock": ["sample_time"],
}
