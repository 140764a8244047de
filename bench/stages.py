"""CPU per message of each stage of the processing path, in this process, no sockets:
where the collector's time goes, so that tuning starts from a measurement.

    .venv/bin/python bench/stages.py [--symbols 50] [--seconds 10] [--repeat 5]

Frames are made by the simulator's own books (the exact payloads it sends), `seconds` of
diff@100ms + depth20@100ms for `symbols` per market, both markets, in the combined-stream
wrapper, handed over as readers do under load (the frames of one 16 KiB read an item:
one exchange write of ~13 KiB per connection, as readers that keep up get it).
Each stage runs `repeat` times; the median is printed, in µs per message.
"""
from __future__ import annotations

import argparse
import queue
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import orjson
import pyarrow.parquet as pq
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import MarketConfig  # noqa: E402
from handlers.ingest.inbox import WS  # noqa: E402
from handlers.process.processor import DIFF, PARTIAL, FrameProcessor  # noqa: E402
from markets import MARKETS  # noqa: E402
from service.memory import tune_gc  # noqa: E402
from simulator.book import Book, IdSource  # noqa: E402
from storage.compact import ROW_GROUP  # noqa: E402
from storage.files import parquet_options  # noqa: E402
from storage.journal import Journal  # noqa: E402
from storage.schemas import SORT_KEYS  # noqa: E402


def make_frames(market: str, symbols: list[str], seconds: float, updates_per_s: float = 20) -> list[bytes]:
    """The frames the simulator would send: per 100 ms tick, one diff and one depth20 per symbol."""
    m = MARKETS[market]
    futures = market == "futures"
    rng = random.Random(7)
    ids = IdSource(futures, rng)
    books = {s: Book.create(s, ids, rng, futures) for s in symbols}
    prev = {s: b.last_id for s, b in books.items()}
    frames = []
    for tick in range(int(seconds * 10)):
        now_ms = 1_764_000_000_000 + tick * 100
        for s, book in books.items():
            bids: dict = {}
            asks: dict = {}
            first = None
            for _ in range(max(1, int(updates_per_s / 10))):
                uid, b, a = book.update()
                first = first or uid
                bids.update(b)
                asks.update(a)
            diff = {"e": "depthUpdate", "E": now_ms}
            if futures:
                diff["T"] = now_ms - 3
            diff.update(s=s, U=first, u=book.last_id)
            if futures:
                diff["pu"] = prev[s]
            diff.update(b=book.render(bids, True), a=book.render(asks, False))
            frames.append(wrap(m.diff_stream(s, "100ms"), diff))
            if futures:
                part = {"e": "depthUpdate", "E": now_ms, "T": now_ms - 3, "s": s, "U": prev[s] + 1,
                        "u": book.last_id, "pu": prev[s], "b": book.levels("bids", 20), "a": book.levels("asks", 20)}
            else:
                part = {"lastUpdateId": book.last_id, "bids": book.levels("bids", 20), "asks": book.levels("asks", 20)}
            prev[s] = book.last_id
            frames.append(wrap(m.partial_stream(s, 20, "100ms"), part))
    return frames


def wrap(stream: str, data: dict) -> bytes:
    return b'{"stream":"' + stream.encode() + b'","data":' + orjson.dumps(data) + b"}"


def market_config(market: str, symbols: list[str]) -> MarketConfig:
    m = MARKETS[market]
    return MarketConfig(market=m, symbols=tuple(symbols), ws_url="ws://x", rest_url="http://x", diff_speed="100ms",
                        partial_levels=20, partial_speed="100ms", snapshot_interval=60, snapshot_limit=1000,
                        symbols_per_connection=50)


def run_processor(cfg: MarketConfig, items: list, journal: Journal | None = None) -> FrameProcessor:
    """The real processor fed `items` (as readers queue them) in its own batch size, no thread."""
    p = FrameProcessor(cfg, None, queue.Queue(), flush_interval=30, now_us=time.time_ns, journal=journal)
    for i in range(0, len(items), 2048):
        p.handle(items[i:i + 2048])
        if journal is not None:
            journal.sync()
    return p


def reads(frames: list[bytes], size: int = 1 << 14) -> list[tuple]:
    """Inbox items as readers make them under load: the frames of one 16 KiB socket read
    (ReadAhead's size) in one item."""
    items: list[tuple] = []
    batch: list[bytes] = []
    held = 0
    for f in frames:
        if batch and held + len(f) > size:
            items.append((WS, 1_764_000_000_000_000 + len(items), 1, batch))
            batch, held = [], 0
        batch.append(f)
        held += len(f) + 4
    if batch:
        items.append((WS, 1_764_000_000_000_000 + len(items), 1, batch))
    return items


def timed(fn: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        runs.append(time.process_time() - t0)
    return statistics.median(runs)


def stages(market: str, frames: list[bytes], symbols: list[str], repeat: int, work: Path) -> dict[str, float]:
    cfg = market_config(market, symbols)
    n = len(frames)
    items = reads(frames)
    out: dict[str, float] = {"frames": n}
    out["orjson.loads"] = timed(lambda: [orjson.loads(f) for f in frames], repeat)

    def process(journal: bool) -> FrameProcessor:
        jr = Journal(work / f"j-{market}", run_id=time.time_ns(), sync_every=0.0) if journal else None
        return run_processor(cfg, items, jr)

    out["decode+route+check+append"] = timed(lambda: process(False), repeat)
    out["... + journal"] = timed(lambda: process(True), repeat)
    # ws_redundancy = 2: every read also comes from a second connection, just after the first
    twice = [item for first in items for item in (first, (WS, first[1] + 50, 2, first[3]))]

    out["2 connections (redundancy)"] = timed(lambda: run_processor(cfg, twice), repeat)

    def redundant_journaled() -> FrameProcessor:
        return run_processor(cfg, twice, Journal(work / f"j2-{market}", run_id=time.time_ns(), sync_every=0.0))

    out["2 connections + journal"] = timed(redundant_journaled, repeat)
    procs = [process(False) for _ in range(repeat)]
    built: list = []

    def build() -> None:
        p = procs.pop()
        p.build()
        built.append([p.outbox.get_nowait() for _ in range(p.outbox.qsize())])

    out["levels to Arrow (build)"] = timed(build, repeat)
    tables = [t for kind, t in built[-1] if kind in (DIFF, PARTIAL)]

    def write() -> None:
        for i, t in enumerate(tables):
            pq.write_table(t, work / f"{market}-{i}.parquet", **parquet_options(9, t.schema))

    out["Parquet ZSTD-9 write"] = timed(write, repeat)
    out["bytes on disk/msg"] = sum((work / f"{market}-{i}.parquet").stat().st_size for i in range(len(tables))) / n
    # as a compacted day file: rows ordered by symbol then time, large row groups
    day = 0
    for kind, t in built[-1]:
        if kind in (DIFF, PARTIAL):
            t = t.sort_by([(k, "ascending") for k in SORT_KEYS[kind]])
            pq.write_table(t, work / f"{market}-day.parquet", row_group_size=ROW_GROUP, **parquet_options(9, t.schema))
            day += (work / f"{market}-day.parquet").stat().st_size
    out["day file bytes/msg"] = day / n
    # the same messages as Binance sent them (combined-stream JSON, one per line), zstd -19
    out["zstd -19 of the raw JSON/msg"] = len(zstandard.ZstdCompressor(level=19).compress(b"\n".join(frames))) / n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--symbols", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    symbols = [f"S{i:04d}USDT" for i in range(args.symbols)]
    tune_gc()  # as the collector does
    with tempfile.TemporaryDirectory() as tmp:
        for market in ("spot", "futures"):
            frames = make_frames(market, symbols, args.seconds)
            r = stages(market, frames, symbols, args.repeat, Path(tmp))
            n = r.pop("frames")
            size, raw = r.pop("bytes on disk/msg"), r.pop("zstd -19 of the raw JSON/msg")
            day = r.pop("day file bytes/msg")
            print(f"{market}: {n} frames ({sum(map(len, frames)) / n:.0f} B avg), µs per message recorded "
                  f"(median of {args.repeat}):")
            for k, v in r.items():
                print(f"  {k:28} {1e6 * v / n:7.2f}")
            print(f"  {'Parquet bytes per message':28} {size:7.1f}   (part files of {n} rows)")
            print(f"  {'Parquet bytes, as a day file':28} {day:7.1f}   (sorted by symbol, time)")
            print(f"  {'zstd -19 of the raw JSON':28} {raw:7.1f}   (part {size / raw:.2f}x, day {day / raw:.2f}x)")


if __name__ == "__main__":
    main()
