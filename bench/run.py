"""Benchmark: the real collector against the simulator at a given load.

    .venv/bin/python bench/run.py [--symbols 50] [--seconds 60] [--rate 20]

Starts the simulator (its own process, both markets), runs collector.py as a
subprocess against it, samples the collector's CPU time and memory from /proc, and
prints messages per second delivered and recorded, CPU µs per message, peak RSS and
bytes on disk per message.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kb(pid: int, key: str = "VmRSS") -> int:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--symbols", type=int, default=50, help="symbols per market")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--rate", type=float, default=20, help="engine updates/s per symbol in the simulator")
    p.add_argument("--snapshot-interval", type=float, default=60)
    p.add_argument("--keep", action="store_true", help="keep the data folder")
    args = p.parse_args()
    symbols = [f"S{i:04d}USDT" for i in range(args.symbols)]
    work = Path(tempfile.mkdtemp(prefix="ob-bench-"))
    ports = free_port(), free_port()
    sim = subprocess.Popen([sys.executable, "-m", "simulator", "--spot-port", str(ports[0]), "--futures-port",
                            str(ports[1]), "--symbols", ",".join(symbols), "--rate", str(args.rate)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for port in ports:
            wait_port(port)
        cfg = work / "config.ini"
        cfg.write_text(
            "[collector]\ndata_dir = data\nstatus_interval = 3600\n"
            + "".join(f"[{m}]\nsymbols = {', '.join(symbols)}\nws_url = ws://127.0.0.1:{port}{suffix}\n"
                      f"rest_url = http://127.0.0.1:{port}\nsnapshot_interval = {args.snapshot_interval}\n"
                      for m, port, suffix in (("spot", ports[0], ""), ("futures", ports[1], "/public"))))
        col = subprocess.Popen([sys.executable, str(ROOT / "collector.py"), "--config", str(cfg)],
                               cwd=work, stderr=open(work / "collector.log", "wb"))
        time.sleep(3)  # start-up (exchangeInfo, connections) is not steady state
        cpu0, t0 = cpu_seconds(col.pid), time.monotonic()
        rows0 = count_rows(work / "data")
        time.sleep(args.seconds)
        cpu1, t1 = cpu_seconds(col.pid), time.monotonic()
        peak = rss_kb(col.pid, "VmHWM")
        col.send_signal(signal.SIGTERM)
        rc = col.wait(60)
        rows1 = count_rows(work / "data")
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)
    msgs = rows1["ws"] - rows0["ws"]  # rows written during the window (+ flush lag either side)
    elapsed = t1 - t0
    disk = sum(f.stat().st_size for f in (work / "data").rglob("*.parquet"))
    print(f"load: {args.symbols} symbols per market, simulator {args.rate} updates/s/symbol, {elapsed:.0f} s")
    print(f"recorded: {msgs / elapsed:,.0f} messages/s (diff + partial), {rows1['snap']} snapshots in total")
    print(f"collector CPU: {100 * (cpu1 - cpu0) / elapsed:.1f} % of one core, "
          f"{1e6 * (cpu1 - cpu0) / max(1, msgs):.1f} µs per message")
    print(f"collector peak RSS: {peak / 1024:.0f} MiB")
    print(f"disk: {disk / max(1, rows1['ws']):.0f} bytes per message (part files, ZSTD 9)")
    print(f"exit status: {rc}; data in {work}" if args.keep else f"exit status: {rc}")


def count_rows(root: Path) -> dict:
    out = {"ws": 0, "snap": 0}
    for f in root.rglob("*.parquet"):
        n = ds.dataset(f).count_rows()
        out["snap" if f.parent.parent.name == "orderbooks" or f.parent.name == "orderbooks" else "ws"] += n \
            if "gaps" not in f.parts else 0
    return out


if __name__ == "__main__":
    main()
