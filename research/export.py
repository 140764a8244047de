"""Exports for the tools researchers already use.

Tardis-style CSV (gzip), the column sets of tardis.dev's normalized datasets:

* `incremental_book_L2`: exchange, symbol, timestamp, local_timestamp, is_snapshot, side,
  price, amount. One row per level: the levels of the REST snapshot that (re)synced the
  book (is_snapshot=true), then every level of every diff applied after it (amount 0
  removes the level). timestamp = exchange event time in µs (`event_time`; the snapshot's
  received time for spot snapshots, which carry none); local_timestamp = received_time.
* `book_snapshot_25`: exchange, symbol, timestamp, local_timestamp, then asks[0..24].price,
  asks[0..24].amount, bids[0..24].price, bids[0..24].amount. One row per applied diff: the
  rebuilt top 25.

hftbacktest (`.npz`, key `data`): its event array, dtype
  ev u8, exch_ts i8, local_ts i8, px f8, qty f8, order_id u8, ival i8, fval f8
with ev = EXCH_EVENT | LOCAL_EVENT | (BUY_EVENT or SELL_EVENT) | (DEPTH_SNAPSHOT_EVENT for the
levels of a (re)sync snapshot, preceded by one DEPTH_CLEAR_EVENT per side, else DEPTH_EVENT);
timestamps in ns. Only synced stretches are exported: after a gap, nothing until the next
snapshot joins the stream.
"""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np

from research.data import synced_updates

EXCH_EVENT, LOCAL_EVENT, BUY_EVENT, SELL_EVENT = 1 << 31, 1 << 30, 1 << 29, 1 << 28
DEPTH_EVENT, DEPTH_CLEAR_EVENT, DEPTH_SNAPSHOT_EVENT = 1, 3, 4
HFT_DTYPE = np.dtype([("ev", "u8"), ("exch_ts", "i8"), ("local_ts", "i8"), ("px", "f8"), ("qty", "f8"),
                      ("order_id", "u8"), ("ival", "i8"), ("fval", "f8")])
EXCHANGE = {"spot": "binance", "futures": "binance-futures", "delivery": "binance-delivery"}


def _exch_us(row: dict, what: str) -> int:
    e = row.get("event_time")  # µs (research.data reads version-1 files' ms as µs)
    return e if e is not None else row["received_time"]


def incremental_book_l2(data_dir: str | Path, market: str, symbol: str, out: Path) -> int:
    n = 0
    with gzip.open(out, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price", "amount"])
        for what, row, _ in synced_updates(data_dir, market, symbol):
            ts, local = _exch_us(row, what), row["received_time"]
            snap = "true" if what == "snapshot" else "false"
            for side, prices, sizes in (("bid", row["bid_prices"], row["bid_sizes"]),
                                        ("ask", row["ask_prices"], row["ask_sizes"])):
                for p, q in zip(prices, sizes, strict=True):
                    w.writerow([EXCHANGE[market], symbol, ts, local, snap, side, repr(p), repr(q)])
                    n += 1
    return n


def book_snapshot_25(data_dir: str | Path, market: str, symbol: str, out: Path) -> int:
    n = 0
    head = ["exchange", "symbol", "timestamp", "local_timestamp"]
    for side in ("asks", "bids"):
        for i in range(25):
            head += [f"{side}[{i}].price", f"{side}[{i}].amount"]
    with gzip.open(out, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for what, row, book in synced_updates(data_dir, market, symbol):
            if what != "diff":
                continue
            bids, asks = book.top(25)
            cells = [EXCHANGE[market], symbol, _exch_us(row, what), row["received_time"]]
            for levels in (asks, bids):
                for i in range(25):
                    cells += [repr(levels[i][0]), repr(levels[i][1])] if i < len(levels) else ["", ""]
            w.writerow(cells)
            n += 1
    return n


def hftbacktest(data_dir: str | Path, market: str, symbol: str, out: Path) -> int:
    rows = []
    base = EXCH_EVENT | LOCAL_EVENT
    for what, row, _ in synced_updates(data_dir, market, symbol):
        exch, local = _exch_us(row, what) * 1000, row["received_time"] * 1000
        kind = DEPTH_SNAPSHOT_EVENT if what == "snapshot" else DEPTH_EVENT
        if what == "snapshot":
            rows += [(base | BUY_EVENT | DEPTH_CLEAR_EVENT, exch, local, 0.0, 0.0, 0, 0, 0.0),
                     (base | SELL_EVENT | DEPTH_CLEAR_EVENT, exch, local, 0.0, 0.0, 0, 0, 0.0)]
        for flag, prices, sizes in ((BUY_EVENT, row["bid_prices"], row["bid_sizes"]),
                                    (SELL_EVENT, row["ask_prices"], row["ask_sizes"])):
            rows += [(base | flag | kind, exch, local, p, q, 0, 0, 0.0) for p, q in zip(prices, sizes, strict=True)]
    np.savez_compressed(out, data=np.array(rows, dtype=HFT_DTYPE))
    return len(rows)


EXPORTS = {"tardis-l2": (incremental_book_l2, ".csv.gz"), "tardis-snap25": (book_snapshot_25, ".csv.gz"),
           "hftbacktest": (hftbacktest, ".npz")}
