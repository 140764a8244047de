"""A longer day made from a short recording, for the replay's benchmarks: the recorded
stretch repeated N times, one after the other, within its UTC day.

    .venv/bin/python bench/longer_day.py SRC_DATA OUT_DATA --times 14

SRC_DATA is a compacted data_dir (e.g. a kept `bench/run.py ... --keep` run, compacted:
its day files `<market>/<kind>/YYYY-MM-DD.parquet`). Copy k of the stretch has every time
column moved on by k stretches, and every update id of a symbol by k times that symbol's
id span, so each symbol's diffs go on from one copy to the next as one unbroken chain
(futures' `prev_final_update_id` of a copy's first diff is the previous copy's last
`final_update_id`), and its snapshots and partial frames fit the diffs around them. The
day files stay sorted by symbol, then time, in row groups as compaction writes them.

What it is for: the replay's cost to its first frame grows with what a selection reads,
so an hour of 100 symbols needs a recording with an hour in it, which this box cannot
record at 2,000 symbols (bench/replay.py --first-frame --window 3600). What it is not: new
market data (the same books come round again) or a test of continuity (it is continuous
by construction).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TIME_COLUMNS = ("received_time", "event_time", "transaction_time", "request_time")
ID_COLUMNS = ("first_update_id", "final_update_id", "prev_final_update_id", "lastUpdateId")
ROW_GROUP = 131_072  # as compaction writes day files
KINDS = ("diff_orderbooks", "partial_orderbooks", "orderbooks")


def id_spans(diffs: Path) -> dict[str, tuple[int, int, int]]:
    """Per symbol: (first U, last u, span) of its diffs; the span moves copy k's ids on."""
    t = pq.read_table(diffs, columns=["symbol", "first_update_id", "final_update_id"])
    g = t.group_by("symbol").aggregate([("first_update_id", "min"), ("final_update_id", "max")])
    return {s: (lo, hi, hi - lo + 1) for s, lo, hi in zip(g.column("symbol").to_pylist(),
                                                        g.column("first_update_id_min").to_pylist(),
                                                        g.column("final_update_id_max").to_pylist(), strict=True)}


def copies(t: pa.Table, times: int, stretch_us: int, spans: dict, first_of_chain: bool) -> pa.Table:
    """`t` (whole symbols, sorted) repeated `times` times, each symbol's copies in turn."""
    symbols = t.column("symbol").to_pylist()
    span = np.array([spans.get(s, (0, 0, 0))[2] for s in symbols], dtype=np.int64)
    last_u = np.array([spans.get(s, (0, 0, 0))[1] for s in symbols], dtype=np.int64)
    first = np.ones(len(symbols), dtype=bool)  # a symbol's first row here (its first diff when diffs)
    first[1:] = np.array(symbols[1:], dtype=object) != np.array(symbols[:-1], dtype=object)
    parts = []
    for k in range(times):
        cols = {}
        for name in t.column_names:
            col = t.column(name)
            if name in TIME_COLUMNS:
                col = pc.add(col, pa.scalar(k * stretch_us, pa.int64()))
            elif name in ID_COLUMNS:
                valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
                moved = pc.fill_null(col, 0).to_numpy(zero_copy_only=False) + k * span
                if name == "prev_final_update_id" and first_of_chain and k > 0:
                    moved = np.where(first & valid, last_u + (k - 1) * span, moved)
                col = pa.array(moved, pa.int64(), mask=~valid)
            cols[name] = col
        parts.append(pa.table(cols, schema=t.schema).append_column("_copy", pa.array(np.full(len(t), k))))
    out = pa.concat_tables(parts)
    order = pc.sort_indices(out, [("symbol", "ascending"), ("_copy", "ascending")])
    return out.take(order).drop_columns(["_copy"])


def lengthen(src: Path, out: Path, times: int, stretch_us: int, spans: dict, kind: str) -> int:
    f = pq.ParquetFile(src)
    schema = f.schema_arrow
    rows = 0
    with pq.ParquetWriter(out, schema, compression="zstd", compression_level=1) as w:
        carry: pa.Table | None = None
        for g in range(f.num_row_groups):
            t = f.read_row_group(g)
            if carry is not None:
                t = pa.concat_tables([carry, t])
            last = t.column("symbol")[len(t) - 1].as_py()
            whole = pc.not_equal(t.column("symbol"), last)
            carry = t.filter(pc.invert(whole))  # the last symbol may go on in the next group
            done = t.filter(whole)
            if len(done):
                w.write_table(copies(done, times, stretch_us, spans, kind == "diff_orderbooks"), ROW_GROUP)
                rows += len(done) * times
        if carry is not None and len(carry):
            w.write_table(copies(carry, times, stretch_us, spans, kind == "diff_orderbooks"), ROW_GROUP)
            rows += len(carry) * times
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--times", type=int, default=14)
    args = p.parse_args()
    if args.out.exists():
        p.error(f"{args.out} exists")
    for market in sorted(d for d in args.src.iterdir() if d.is_dir() and not d.name.startswith(".")):
        diffs = sorted((market / "diff_orderbooks").glob("*.parquet"))
        if not diffs:
            continue
        day = diffs[0].stem
        spans = id_spans(diffs[0])
        times = pq.read_table(diffs[0], columns=["received_time"]).column("received_time")
        lo, hi = (v.as_py() for v in pc.min_max(times).values())
        stretch_us = (hi - lo) // 1_000_000 * 1_000_000 + 1_000_000  # whole seconds, past the last diff
        for kind in KINDS:
            src = market / kind / f"{day}.parquet"
            if not src.exists():
                continue
            (args.out / market.name / kind).mkdir(parents=True, exist_ok=True)
            n = lengthen(src, args.out / market.name / kind / src.name, args.times, stretch_us, spans, kind)
            print(f"{market.name}/{kind}: {n:,} rows ({args.times} x {stretch_us / 1e6:.0f} s)", flush=True)
        for kind in ("gaps", "clock"):  # as recorded: the start of each symbol, the clock's minutes
            if (market / kind).exists():
                shutil.copytree(market / kind, args.out / market.name / kind)


if __name__ == "__main__":
    main()
