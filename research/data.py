"""A small API for research code over the recorded files (day files and today's parts).

    from research.data import load, books, book_at
    t = load("data", "futures", "diff_orderbooks", symbol="BTCUSDT", start="2026-11-24T10:00")
    df = t.to_pandas()
    for when_us, u, bids, asks in books("data", "futures", "BTCUSDT", depth=5, every_us=1_000_000):
        ...
    bids, asks = book_at("data", "spot", "BTCUSDT", "2026-11-24T12:00:00")
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from markets import MARKETS
from research.book import Book
from storage.schemas import DAY_COLUMN, exchange_times_in_us

PathLike = str | Path
# a moment: µs since the epoch, a datetime, or an ISO 8601 text (UTC when it names no zone)
When = int | dt.datetime | str | None



def to_us(when: When) -> int | None:
    """µs since the epoch from an int (µs), a datetime, or an ISO string (UTC if naive)."""
    if when is None or isinstance(when, int):
        return when
    if isinstance(when, str):
        when = dt.datetime.fromisoformat(when)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1_000_000)


def load(data_dir: PathLike, market: str, kind: str, symbol: str | None = None, start: When = None, end: When = None,
         columns: list[str] | None = None) -> pa.Table:
    """Rows of one market and kind, optionally one symbol and a [start, end) time range."""
    files = sorted(str(p) for p in (Path(data_dir) / market / kind).rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {Path(data_dir) / market / kind}")
    dataset = ds.dataset(files, format="parquet")
    col = DAY_COLUMN[kind]  # the time that puts a row in its day
    cond = None
    for c in ((pc.field("symbol") == symbol) if symbol else None,
              (pc.field(col) >= to_us(start)) if start is not None else None,
              (pc.field(col) < to_us(end)) if end is not None else None):
        if c is not None:
            cond = c if cond is None else cond & c
    return exchange_times_in_us(dataset.to_table(filter=cond, columns=columns))  # version-1 files: ms -> µs


def _events(data_dir: PathLike, market: str, symbol: str, end_us: int | None) -> list[tuple]:
    """Snapshots and diffs of a symbol in update-id order (snapshots first at equal ids)."""
    snaps = load(data_dir, market, "orderbooks", symbol=symbol, end=end_us).to_pylist()
    diffs = load(data_dir, market, "diff_orderbooks", symbol=symbol, end=end_us).to_pylist()
    seen, events = set(), []
    for s in snaps:
        events.append((s["lastUpdateId"], 0, s["received_time"], "snapshot", s))
    for d in diffs:
        if d["final_update_id"] not in seen:  # written once per id; a copy from any source is the same event
            seen.add(d["final_update_id"])
            events.append((d["final_update_id"], 1, d["received_time"], "diff", d))
    events.sort(key=lambda e: (e[0], e[1]))
    return events


def synced_updates(data_dir: PathLike, market: str, symbol: str,
                   end_us: int | None = None) -> Iterator[tuple[str, dict, Book]]:
    """Binance's rebuild procedure as a stream, in update-id order: ("snapshot", row, book)
    when a snapshot (re)syncs the book (yielded just before the first diff that joins it),
    then ("diff", row, book) per applied diff. After a gap nothing is yielded until the
    next snapshot joins the stream again."""
    book = Book(MARKETS[market])
    pending = None
    for _, _, _, what, row in _events(data_dir, market, symbol, end_us):
        if what == "snapshot":
            if not book.synced:
                book.reset(row["lastUpdateId"], row["bid_prices"], row["bid_sizes"], row["ask_prices"], row["ask_sizes"])
                pending = row
            continue
        verdict = book.offer(row["first_update_id"], row["final_update_id"], row["prev_final_update_id"])
        if verdict == "gap":
            book, pending = Book(book.market), None
            continue
        if verdict == "stale":
            continue
        if pending is not None:
            yield "snapshot", pending, book
            pending = None
        book.apply(row["final_update_id"], row["bid_prices"], row["bid_sizes"], row["ask_prices"], row["ask_sizes"])
        yield "diff", row, book


def books(data_dir: PathLike, market: str, symbol: str, start: When = None, end: When = None, depth: int = 10,
          every_us: int | None = None) -> Iterator[tuple[int, int, list, list]]:
    """Rebuilt books: (received_time, update id, bids, asks), top `depth` levels, at every
    update, or at most once per `every_us`; only synced books (see synced_updates)."""
    start_us, end_us = to_us(start), to_us(end)
    next_at = None
    for what, row, book in synced_updates(data_dir, market, symbol, end_us):
        when = row["received_time"]
        if what != "diff" or (start_us is not None and when < start_us):
            continue
        if every_us is None or next_at is None or when >= next_at:
            next_at = when + (every_us or 0)
            yield (when, row["final_update_id"], *book.top(depth))


def book_at(data_dir: PathLike, market: str, symbol: str, when: When, depth: int = 20) -> tuple[list, list]:
    """The book as rebuilt from everything received up to `when`."""
    end = to_us(when)
    if end is None:
        raise ValueError("book_at needs a moment")
    last = None
    for item in books(data_dir, market, symbol, end=end + 1, depth=depth):
        last = item
    if last is None:
        raise LookupError(f"no synced book of {symbol} before {when}")
    return last[2], last[3]
