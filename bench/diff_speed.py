"""What recording every event costs: USD-M `diff_speed = 0ms` (`<symbol>@depth@0ms`) against
the default 100 ms aggregate, on the same books moving at the same rate, in one run.

    .venv/bin/python bench/diff_speed.py [--symbols 50] [--rate 20] [--seconds 30] [--runs 2]

The simulator (`python -m simulator`, its real moving books, not load mode) moves every
futures book `--rate` times a second; the collector records it at `ws_redundancy` 2, its
runs at 100ms and 0ms alternating. Printed per speed (medians over the runs): diff rows
a second, CPU of the whole process tree (the collector and its stamp relays) as % of a
core, CPU µs per book update (the same input at both speeds) and per recorded message
(diff and depth20 rows),
peak RSS of the tree, and on-disk bytes per diff row; then the ratio 0ms / 100ms.
"""
from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import cpu_seconds, free_port, tree_kib, wait_port  # noqa: E402


def rows_in(root: Path, kind: str, since_us: int, until_us: int) -> int:
    t = ds.field("received_time")
    return ds.dataset(root / "futures" / kind, format="parquet").count_rows(filter=(t >= since_us) & (t < until_us))


def diff_bytes_per_row(root: Path) -> float:
    folder = root / "futures" / "diff_orderbooks"
    size = sum(p.stat().st_size for p in folder.rglob("*.parquet"))
    return round(size / max(1, ds.dataset(folder, format="parquet").count_rows()), 1)


def one_run(work: Path, port: int, symbols: list[str], speed: str, args: argparse.Namespace) -> dict:
    data = work / f"data-{speed}-{time.monotonic_ns()}"
    config = work / "config.ini"
    config.write_text(f"""[collector]
data_dir = {data}
flush_interval = 5
status_interval = 60
metrics_listen = off
[spot]
enabled = false
[futures]
symbols = {", ".join(symbols)}
ws_url = ws://127.0.0.1:{port}/public
rest_url = http://127.0.0.1:{port}
diff_speed = {speed}
snapshot_interval = 60
snapshot_limit = 100
listing_check = 0
""")
    log = (work / f"collector-{speed}.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "collector.py"), "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while "ready:" not in (work / f"collector-{speed}.log").read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("collector not ready:\n" + (work / f"collector-{speed}.log").read_text()[-2000:])
            time.sleep(0.2)
        time.sleep(3)  # the first snapshots and the part files' start
        t0, c0 = time.time_ns() // 1000, cpu_seconds(proc.pid)
        time.sleep(args.seconds)
        t1, c1 = time.time_ns() // 1000, cpu_seconds(proc.pid)
        rss = tree_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    diffs, partials = (rows_in(data, kind, t0, t1) for kind in ("diff_orderbooks", "partial_orderbooks"))
    seconds = (t1 - t0) / 1e6
    updates = args.rate * len(symbols) * seconds
    cpu = c1 - c0
    return {"diff rows/s": round(diffs / seconds), "cpu %": round(100 * cpu / seconds, 1),
            "µs/update": round(1e6 * cpu / updates, 1),
            "µs/message": round(1e6 * cpu / max(1, diffs + partials), 1),  # diff and depth20 rows recorded
            "peak RSS MiB": round(rss / 1024), "part bytes/diff row": diff_bytes_per_row(data)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--symbols", type=int, default=50)
    p.add_argument("--rate", type=float, default=20.0, help="book updates a second per symbol")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    symbols = [f"S{i:03d}USDT" for i in range(args.symbols)]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        sim = subprocess.Popen([sys.executable, "-m", "simulator", "--futures-port", str(port),
                                "--spot-port", str(free_port()), "--symbols", ",".join(symbols),
                                "--rate", str(args.rate)], cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            wait_port(port)
            results: dict[str, list[dict]] = {"100ms": [], "0ms": []}
            for _ in range(args.runs):
                for speed in results:
                    results[speed].append(one_run(Path(tmp), port, symbols, speed, args))
                    print(speed, results[speed][-1], flush=True)
        finally:
            sim.terminate()
            sim.wait(10)
    medians = {speed: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for speed, runs in results.items()}
    print(f"\n{args.symbols} USD-M symbols, {args.rate:g} book updates/s each, ws_redundancy 2, "
          f"{args.seconds:g} s x {args.runs} runs (medians; CPU and RSS: collector + stamp relays)")
    for speed, m in medians.items():
        print(f"  {speed:>6}: " + ", ".join(f"{k} {v:g}" for k, v in m.items()))
    print("  0ms / 100ms: " + ", ".join(f"{k} {medians['0ms'][k] / max(1e-9, medians['100ms'][k]):.2f}x"
                                       for k in medians["0ms"]))


if __name__ == "__main__":
    main()
