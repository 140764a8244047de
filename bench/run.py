"""Benchmark: the real collector against the simulator at a given load, beside the floor.

    .venv/bin/python bench/run.py [--symbols 50] [--seconds 60] [--rate 20] [--runs 3]

Starts the simulator (its own process, both markets), runs collector.py as a subprocess
against it and, over the same window, bench/floor.py (a bare websocket-client reader of
the same streams that receives and discards). Prints, per run and as medians: messages per
second delivered and recorded, CPU µs per message for the collector and for the floor and
their ratio, peak RSS, queue depth, and bytes on disk per message against zstd -19 of the
raw JSON of the same messages.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICKS = os.sysconf("SC_CLK_TCK")

from handlers.websocket import combined_url  # noqa: E402
from markets import MARKETS  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"simulator did not listen on {port}")


def count_ws_rows(root: Path) -> int:
    total = 0
    for market in ("spot", "futures"):
        for kind in ("diff_orderbooks", "partial_orderbooks"):
            folder = root / market / kind
            if folder.exists():
                total += ds.dataset(folder, format="parquet").count_rows()
    return total


def one_run(args, symbols: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ob-bench-"))
    ports = {"spot": free_port(), "futures": free_port()}
    sim = subprocess.Popen([sys.executable, "-m", "simulator", "--spot-port", str(ports["spot"]), "--futures-port",
                            str(ports["futures"]), "--symbols", ",".join(symbols), "--rate", str(args.rate)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    urls = []
    try:
        for port in ports.values():
            wait_port(port)
        sections = []
        for name, port in ports.items():
            ws_url = f"ws://127.0.0.1:{port}" + ("/public" if name == "futures" else "")
            sections.append(f"[{name}]\nsymbols = {', '.join(symbols)}\nws_url = {ws_url}\n"
                            f"rest_url = http://127.0.0.1:{port}\nsnapshot_interval = {args.snapshot_interval}\n")
            m = MARKETS[name]
            for i in range(0, len(symbols), 50):
                streams = [s for sym in symbols[i:i + 50] for s in (m.diff_stream(sym, "100ms"),
                                                                       m.partial_stream(sym, 20, "100ms"))]
                urls.append(combined_url(ws_url, streams))
        cfg = work / "config.ini"
        cfg.write_text("[collector]\ndata_dir = data\nstatus_interval = 5\n" + "".join(sections))
        log = open(work / "collector.log", "wb")
        col = subprocess.Popen([sys.executable, str(ROOT / "collector.py"), "--config", str(cfg)], cwd=work, stderr=log)
        time.sleep(4)  # start-up (exchangeInfo, connections, first snapshots) is not steady state
        floor = subprocess.Popen([sys.executable, str(ROOT / "bench" / "floor.py"), str(args.seconds), *urls],
                                 stdout=subprocess.PIPE, text=True)
        cpu0, t0, rows0 = cpu_seconds(col.pid), time.monotonic(), count_ws_rows(work / "data")
        time.sleep(args.seconds)
        cpu1, t1 = cpu_seconds(col.pid), time.monotonic()
        peak = proc_status(col.pid, "VmHWM")
        col.send_signal(signal.SIGTERM)
        rc = col.wait(60)
        floor_frames, floor_cpu = (float(x) for x in floor.communicate(timeout=60)[0].split())
        rows1 = count_ws_rows(work / "data")
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)
    elapsed = t1 - t0
    recorded = rows1 - rows0  # rows that reached disk in the window (flush lag evens out)
    queues = [int(q) for q in re.findall(r"queue=(\d+)", (work / "collector.log").read_text())]
    disk, raw = bytes_per_message(work / "data")
    # per message delivered in the window (the floor counts the same streams over the same window)
    col_us = 1e6 * (cpu1 - cpu0) / max(1, floor_frames * elapsed / args.seconds)
    floor_us = 1e6 * floor_cpu / max(1, floor_frames)
    return {"delivered/s": floor_frames / args.seconds, "recorded/s": recorded / elapsed, "collector_us": col_us,
            "floor_us": floor_us, "ratio": col_us / floor_us if floor_us else float("nan"),
            "collector_cpu_%": 100 * (cpu1 - cpu0) / elapsed, "peak_rss_MiB": peak / 1024,
            "max_queue": max(queues or [0]), "disk_B/msg": disk, "zstd19_B/msg": raw, "exit": rc}


def bytes_per_message(root: Path) -> tuple[float, float]:
    """Parquet bytes per diff/partial row, and zstd -19 of the same messages' raw JSON
    (rebuilt from the rows: Binance's JSON text, one message per line)."""
    files = [f for m in ("spot", "futures") for k in ("diff_orderbooks", "partial_orderbooks")
             for f in (root / m / k).rglob("*.parquet")]
    rows = sum(ds.dataset(f).count_rows() for f in files)
    disk = sum(f.stat().st_size for f in files)
    sample = ds.dataset(files[:20], format="parquet").to_table().slice(0, 20000).to_pylist()
    lines = []
    for r in sample:
        b = [[f"{p:.8f}", f"{q:.8f}"] for p, q in zip(r["bid_prices"], r["bid_sizes"], strict=True)]
        a = [[f"{p:.8f}", f"{q:.8f}"] for p, q in zip(r["ask_prices"], r["ask_sizes"], strict=True)]
        lines.append(('{"e":"depthUpdate","E":%s,"s":"%s","U":%s,"u":%s,"b":%s,"a":%s}' % (
            r["event_time"], r["symbol"], r["first_update_id"], r["final_update_id"], b, a)).replace("'", '"'))
    raw = zstandard.ZstdCompressor(level=19).compress("\n".join(lines).encode())
    return disk / max(1, rows), len(raw) / max(1, len(sample))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--symbols", type=int, default=50, help="symbols per market")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--rate", type=float, default=20, help="engine updates/s per symbol in the simulator")
    p.add_argument("--snapshot-interval", type=float, default=60)
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args()
    symbols = [f"S{i:04d}USDT" for i in range(args.symbols)]
    results = []
    for i in range(args.runs):
        r = one_run(args, symbols)
        results.append(r)
        print(f"run {i + 1}: " + "  ".join(f"{k}={v:,.1f}" for k, v in r.items()), flush=True)
    print(f"load: {args.symbols} symbols per market (diff@100ms + depth20@100ms), simulator {args.rate} "
          f"updates/s/symbol, {args.seconds:.0f} s per run, {args.runs} run(s); medians:")
    for k in results[0]:
        print(f"  {k:16} {statistics.median(r[k] for r in results):,.2f}")


if __name__ == "__main__":
    main()
