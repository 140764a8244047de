"""Benchmark: `collector.py verify` on a day of one busy symbol (default 1,000,000 diffs).

    .venv/bin/python bench/verify_day.py [--diffs 1000000]

Writes a synthetic futures day (one symbol; diffs of 1-10 levels, a snapshot every 10,000
diffs) with the simulator's book model, then times the full verify of it: load, chain check,
book rebuild, snapshot comparisons.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from research import verify  # noqa: E402
from storage.files import day_start_us, write_table_atomic  # noqa: E402
from storage.schemas import SCHEMAS  # noqa: E402


def build(root: Path, n: int) -> None:
    rng = random.Random(5)
    t0 = day_start_us("2026-11-24")
    book: dict[tuple[bool, float], float] = {}
    cols: dict[str, list] = {k: [] for k in SCHEMAS["diff_orderbooks"].names}
    snaps: dict[str, list] = {k: [] for k in SCHEMAS["orderbooks"].names}
    u = 10**9
    for i in range(n):
        U, u_prev = u + 1, u
        u = U + rng.randrange(0, 30)
        bp: list[float] = []
        bs: list[float] = []
        ap: list[float] = []
        asz: list[float] = []
        for _ in range(rng.randrange(1, 11)):
            bid = rng.random() < 0.5
            p = round(100 + (-1 if bid else 1) * rng.randrange(1, 200) * 0.01, 2)
            q = 0.0 if rng.random() < 0.2 else float(rng.randrange(1, 1000))
            (bp if bid else ap).append(p)
            (bs if bid else asz).append(q)
            book[(bid, p)] = q
        t = t0 + i * 80_000
        for k, v in (("received_time", t), ("event_time", t // 1000), ("symbol", "BTCUSDT"), ("first_update_id", U),
                     ("final_update_id", u), ("prev_final_update_id", u_prev), ("transaction_time", t // 1000),
                     ("bid_prices", bp), ("bid_sizes", bs), ("ask_prices", ap), ("ask_sizes", asz)):
            cols[k].append(v)
        if i % 10_000 == 0:
            levels = {s: sorted((p, q) for (b, p), q in book.items() if b == s and q) for s in (True, False)}
            for k, v in (("request_time", t), ("received_time", t + 1), ("lastUpdateId", u),
                         ("bid_prices", [p for p, _ in levels[True]]), ("bid_sizes", [q for _, q in levels[True]]),
                         ("ask_prices", [p for p, _ in levels[False]]), ("ask_sizes", [q for _, q in levels[False]]),
                         ("limit", 1000), ("symbol", "BTCUSDT"), ("event_time", t // 1000),
                         ("transaction_time", t // 1000)):
                snaps[k].append(v)
    write_table_atomic(root / "futures/diff_orderbooks/2026-11-24.parquet",
                       pa.table(cols, schema=SCHEMAS["diff_orderbooks"]), 3)
    write_table_atomic(root / "futures/orderbooks/2026-11-24.parquet", pa.table(snaps, schema=SCHEMAS["orderbooks"]), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--diffs", type=int, default=1_000_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ob-verify-") as tmp:  # removed afterwards, as bench/run.py does
        root = Path(tmp)
        t = time.perf_counter()
        build(root, args.diffs)
        print(f"built {args.diffs:,} diffs in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        report = verify.verify(root, "futures", "2026-11-24")
        took = time.perf_counter() - t
        r = report["symbols"]["BTCUSDT"]
        print(f"verify: {took:.1f} s for {r['diffs']:,} diffs ({1e6 * took / r['diffs']:.1f} µs per diff); "
              f"{r['snapshots_compared']} snapshots compared, agreement "
              f"{100 * r['snapshot_levels_same'] / max(1, r['snapshot_levels_compared']):.2f}%; problems: {report['problems']}")


if __name__ == "__main__":
    main()
