"""Parquet settings compared on the same rows: bytes per message for each candidate.

    .venv/bin/python bench/encodings.py [--symbols 50] [--seconds 60]
    .venv/bin/python bench/encodings.py --parts --symbols 1000 --seconds 2

Rows come from the simulator's evolving books through the real processor (as in
bench/stages.py), sorted as a day file; each candidate writes them to memory. With
`--parts`, rows stay in arrival order, as the writers encode part files, and the day
files' settings (`parquet_options`) are compared with the part files' (`part_options`):
CPU µs and bytes per row, best of 3.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stages import make_frames, market_config, run_processor  # noqa: E402

from handlers.ingest.inbox import WS  # noqa: E402
from handlers.process.processor import DIFF, PARTIAL  # noqa: E402
from service.memory import tune_gc  # noqa: E402
from storage.files import parquet_options, part_options  # noqa: E402
from storage.writer import ROW_GROUP_ROWS  # noqa: E402

INTS = ["received_time", "event_time", "first_update_id", "final_update_id", "prev_final_update_id", "transaction_time"]
LEVELS = ["bid_prices", "bid_sizes", "ask_prices", "ask_sizes"]
BASE: dict[str, Any] = dict(compression="zstd", compression_level=9, use_dictionary=["symbol"], write_page_checksum=True)
CANDIDATES: dict[str, dict[str, Any]] = {
    "zstd-9, dictionary for symbol": {},
    "+ delta for int64": dict(column_encoding={c: "DELTA_BINARY_PACKED" for c in INTS}),
    "+ byte-stream-split for levels": dict(use_byte_stream_split=LEVELS),
    "+ both": dict(column_encoding={**{c: "DELTA_BINARY_PACKED" for c in INTS}, **{c: "BYTE_STREAM_SPLIT" for c in LEVELS}}),
    "zstd-19 (no delta)": dict(compression_level=19),
}


def tables(market: str, symbols: list[str], seconds: float, ordered: bool = True) -> tuple[dict, list[bytes]]:
    frames = make_frames(market, symbols, seconds)
    items = [(WS, 1_764_000_000_000_000 + i * 50, 1, [f]) for i, f in enumerate(frames)]
    p = run_processor(market_config(market, symbols), items)
    p.build()
    out: dict = {}
    while not p.outbox.empty():
        kind, t = p.outbox.get()
        if kind in (DIFF, PARTIAL):
            out.setdefault(kind, []).append(t)
    if not ordered:
        return {k: pa.concat_tables(v) for k, v in out.items()}, frames
    return {k: pa.concat_tables(v).sort_by([("symbol", "ascending"), ("received_time", "ascending")])
            for k, v in out.items()}, frames


def parts(market: str, symbols: list[str], seconds: float) -> None:
    by_kind, _ = tables(market, symbols, seconds, ordered=False)
    for kind, t in by_kind.items():
        for name, options in (("parquet_options (day files)", parquet_options(9, t.schema)),
                              ("part_options (part files)", part_options(9, t.schema, kind))):
            best = float("inf")
            for _ in range(3):
                buf = io.BytesIO()
                start = time.process_time()
                pq.write_table(t, buf, row_group_size=ROW_GROUP_ROWS, **options)
                best = min(best, time.process_time() - start)
            print(f"{market:7} {kind:18} {name:28} {1e6 * best / t.num_rows:6.2f} µs/row"
                  f" {len(buf.getvalue()) / t.num_rows:6.1f} B/row")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--parts", action="store_true", help="part files: arrival order, CPU and bytes")
    args = ap.parse_args()
    tune_gc()
    symbols = [f"S{i:04d}USDT" for i in range(args.symbols)]
    if args.parts:
        for market in ("spot", "futures"):
            parts(market, symbols, args.seconds)
        return
    for market in ("spot", "futures"):
        by_kind, frames = tables(market, symbols, args.seconds)
        for kind, t in by_kind.items():
            raw = [f for f in frames if (b"@depth20" in f) == (kind == PARTIAL)]
            z19 = len(zstandard.ZstdCompressor(level=19).compress(b"\n".join(raw))) / t.num_rows
            print(f"{market} {kind}: {t.num_rows} rows; raw JSON at zstd -19: {z19:.1f} B/msg")
            for name, extra in CANDIDATES.items():
                buf = io.BytesIO()
                pq.write_table(t, buf, **{**BASE, **extra})
                print(f"  {name:34} {len(buf.getvalue()) / t.num_rows:6.1f} B/msg")


if __name__ == "__main__":
    main()
