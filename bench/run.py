"""Benchmark: the real collector against the simulator at a given load, beside the floor.

    .venv/bin/python bench/run.py [--symbols 50] [--seconds 60] [--runs 3] [--no-floor]
    .venv/bin/python bench/run.py --step 250,500,1000,2000 --seconds 60     # the last sustained rate
    .venv/bin/python bench/run.py --smoke                                   # CI: it runs, prints, loses nothing
    .venv/bin/python bench/run.py --collector /tmp/old-checkout             # the same load on another version
    .venv/bin/python bench/run.py --redundancy 1,2 --runs 3                 # ws_redundancy 1 against 2, runs alternating
    .venv/bin/python bench/run.py --universe 1500,550,50 --redundancy 2     # the real universe's shape, three markets
    .venv/bin/python bench/run.py --profiles 100ms,finest --runs 2          # the finest data against the 100 ms streams
    .venv/bin/python bench/run.py --writes burst,each --cryptofeed          # both write patterns, cryptofeed beside

`--writes burst,each` runs each write pattern of the simulator in turn: `burst`, a
connection's frames of a 10 ms tick in one write (as the exchange pushes its 100 ms
streams: several frames a socket read), and `each`, every frame its own write with 1 ms
ticks (as every-event streams come: one frame a read, where a cost paid per read shows).
Profiles, write patterns and `--redundancy` values combine; runs alternate.

`--cryptofeed` also runs cryptofeed 2.4.1 (`bench/cryptofeed_reader.py`, in a virtual
environment of its own that the first use makes and installs from PyPI) reading the same
diff streams once, one connection a market, keeping its books, over the same window:
`cryptofeed_us` is its CPU per message it handled, `vs_cryptofeed` the collector's CPU per
recorded message over it.

CPU and peak RSS are always the **whole process tree**: the collector plus every process it
started (its stamp relays), each process's peak RSS summed.

`--profiles 100ms,finest` alternates the default load with the finest data Binance
publishes (simulator/load.py, profile `finest`): spot as SBE (`feed = sbe`: binary diffs
every 20 ms, depth20 every 50 ms), USD-M every event (`diff_speed = 0ms`: one frame and
one write an event, the first symbol near 1,000 events a second in bursts, the tail a few),
and prints each one's medians and its CPU per message against the first.

`--universe S,F,D` runs spot, USD-M and COIN-M with S, F and D symbols, shaped like the
real exchange (simulator/load.py, profile `universe`): every partial depth stream every
100 ms, the diffs of each market's first 100 symbols every 100 ms and the rest every
300 ms. `--process-per-market` then runs one collector per market (figures summed, peak
RSS the largest), the alternative when one interpreter cannot hold the load.

Starts the simulator in load mode (its own process, both markets; simulator/load.py),
runs collector.py as a subprocess against it and, over the same window, bench/floor.py
(bare websocket-client readers of the same copies, ws_redundancy connections a batch as the
collector opens, that receive and discard; `floor_us` is their CPU a message, each message
read as many times as the collector reads it). Each
symbol has diff@100ms and depth20@100ms streams in both markets: 40 messages/s per
symbol. Prints, per run and as medians: messages per second sent, recorded and read by
the floor; CPU µs per message of the collector and of the floor, and their ratio; CPU
share; peak RSS; queue depth over time; stamp delay (received_time minus the simulator's
exact write time) p50/p99, and how far a stamp fell after the write to its connection
had ended (the stamp's own error); lost diffs (gaps other than each symbol's start); bytes on
disk per message against zstd -19 of the same messages' raw JSON. Each run's folder
(`/tmp/ob-bench-*`: data, collector log, config) is removed once its figures are read;
`--keep` keeps it and prints where.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICKS = os.sysconf("SC_CLK_TCK")

from config import _COLLECTOR_DEFAULTS  # noqa: E402
from handlers.ingest.websocket import combined_url  # noqa: E402
from markets import MARKETS  # noqa: E402
from simulator.load import WRITES  # noqa: E402

MARKET_NAMES = ("spot", "futures", "delivery")
WS_KINDS = ("diff_orderbooks", "partial_orderbooks")


CRYPTOFEED = "2.4.1"
CRYPTOFEED_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / f"obc-bench/cryptofeed-{CRYPTOFEED}"


def cryptofeed_python() -> Path:
    """The interpreter of a virtual environment with cryptofeed (made, and cryptofeed
    installed from PyPI, on first use: the comparison is one command)."""
    python = CRYPTOFEED_VENV / "bin" / "python"
    probe = [str(python), "-c", f"import cryptofeed, importlib.metadata as m; "
                                f"assert m.version('cryptofeed') == '{CRYPTOFEED}'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing cryptofeed {CRYPTOFEED} into {CRYPTOFEED_VENV} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(CRYPTOFEED_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"cryptofeed=={CRYPTOFEED}"], check=True)
    subprocess.run(probe, check=True)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat_cpu(stat: Path) -> float:
    """utime + stime of a /proc stat file, in seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    """The process's live child processes (the collector's stamp relay; a compaction)."""
    out = []
    for task in _tasks(pid):  # a child is listed under the thread that started it
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pid: int) -> float:
    """The process's CPU and that of its live children (the stamp relay is part of the
    collector's cost)."""
    total = _stat_cpu(Path(f"/proc/{pid}/stat"))
    for child in children(pid):
        try:
            total += _stat_cpu(Path(f"/proc/{child}/stat"))
        except OSError:
            pass  # ended meanwhile
    return total


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (group, CPU seconds) of every thread of the process and its children,
    grouped by the names the collector gives its threads (service/threads.py)."""
    out = {}
    tasks = [t for p in [pid, *children(pid)] for t in _tasks(p)]
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
            cpu = _stat_cpu(task / "stat")
        except OSError:
            continue  # the thread ended meanwhile
        group = ("reader" if name.startswith("ws-") and "-c" in name else
                 name.split("-")[0] if name.startswith(("processor", "writer", "snapshot", "rest", "ws-", "stamp"))
                 else "other")
        out[int(task.name)] = (group, cpu)
    return out


def _tasks(pid: int) -> list[Path]:
    try:
        return list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []


def cpu_by_group(before: dict, after: dict, messages: float) -> dict[str, float]:
    """CPU µs per message of each thread group over the window (threads that started in
    it count from zero)."""
    groups: dict[str, float] = {}
    for tid, (group, cpu) in after.items():
        groups[group] = groups.get(group, 0.0) + cpu - before.get(tid, (group, 0.0))[1]
    return {g: round(1e6 * v / max(1.0, messages), 1) for g, v in sorted(groups.items())}


def peak_rss_kib(pid: int, key: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def tree_kib(pid: int, key: str = "VmHWM") -> int:
    """The process's and its live children's (the stamp relays') peak (or, VmRSS, current) RSS
    summed: what the collector costs, helpers included (the peaks' sum: at or above the
    tree's own peak)."""
    total = peak_rss_kib(pid, key)
    for child in children(pid):
        try:
            total += peak_rss_kib(child, key)
        except OSError:
            pass  # ended meanwhile
    return total


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"simulator did not listen on {port}")


def count_ws_rows(root: Path, t0_us: int, t1_us: int) -> int:
    """Diff and partial rows whose received_time falls in [t0_us, t1_us)."""
    total = 0
    for market in MARKET_NAMES:
        for kind in WS_KINDS:
            folder = root / market / kind
            if folder.exists():
                t = ds.field("received_time")
                total += ds.dataset(folder, format="parquet").count_rows(filter=(t >= t0_us) & (t < t1_us))
    return total


def write_config(work: Path, ports: dict[str, int], plan: dict[str, list[str]], args: argparse.Namespace,
                 name: str = "config.ini") -> tuple[Path, list[str]]:
    """A collector config for the markets in `ports`; the combined-stream URLs it opens."""
    sections, urls = [], []
    for market, port in ports.items():
        m = MARKETS[market]
        ws_url = f"ws://127.0.0.1:{port}" + m.ws_path_prefix
        symbols = plan[market]
        finest = FINEST[market] if args.profile == "finest" else ""
        sections.append(f"[{market}]\nsymbols = {', '.join(symbols)}\nws_url = {ws_url}\n"
                        f"rest_url = http://127.0.0.1:{port}\nsnapshot_interval = {args.snapshot_interval}\n"
                        f"symbols_per_connection = {args.per_connection}\n{finest}")
        for i in range(0, len(symbols), args.per_connection):
            if finest == "feed = sbe\n":
                streams = [f"{sym.lower()}@depth{n}" for sym in symbols[i:i + args.per_connection] for n in ("", "20")]
                urls.append(combined_url(ws_url, streams))
                continue
            speed = "0ms" if finest else "100ms"
            streams = [s for sym in symbols[i:i + args.per_connection]
                       for s in (m.diff_stream(sym, speed), m.partial_stream(sym, 20, "100ms"))]
            urls.append(combined_url(ws_url, streams, m.ws_query))
    cfg = work / name
    level = f"compression_level = {args.compression_level}\n" if args.compression_level else ""
    # unless asked for, the collector's own default (an older version may not know the key)
    level += f"ws_redundancy = {args.ws_redundancy}\n" if args.ws_redundancy else ""
    cfg.write_text("[collector]\ndata_dir = data\nstatus_interval = 5\nmetrics_listen = off\n" + level + "".join(sections))
    return cfg, urls


FINEST = {"spot": "feed = sbe\n", "futures": "diff_speed = 0ms\n", "delivery": "diff_speed = 0ms\n"}
CRYPTOFEED_WARMUP = 5.0  # s for cryptofeed to connect and sync its books before its window
API_KEY = "bench-key"  # the simulator takes any key for its SBE streams


def wait_connected(logs: list[Path], expected: int, since: float, at_least: float, at_most: float) -> float:
    """Wait `at_least` seconds, and up to `at_most` for `expected` connections to deliver
    (their "connected" lines; a connection counts once its handshake is done, and each
    batch carries 100 ms partial depth streams); seconds from `since` to the last one, or
    nan if they did not all come up."""
    done = float("nan")
    deadline = since + max(at_least, at_most)
    while time.monotonic() < deadline:
        n = sum(log.read_text(errors="replace").count("connected conn=") for log in logs if log.exists())
        if n >= expected and done != done:
            done = time.monotonic() - since
        if done == done and time.monotonic() >= since + at_least:
            break
        time.sleep(0.2)
    return done


def universe_plan(counts: str) -> dict[str, list[str]]:
    """Generated symbols of the three markets (the simulator makes the same names)."""
    spot, futures, delivery = (int(x) for x in counts.split(","))
    return {"spot": [f"S{i:04d}USDT" for i in range(spot)], "futures": [f"S{i:04d}USDT" for i in range(futures)],
            "delivery": [f"S{i:04d}USD_PERP" for i in range(delivery)]}


def one_run(args: argparse.Namespace, n_symbols: int, floor_on: bool) -> dict:
    symbols = [f"S{i:04d}USDT" for i in range(n_symbols)]
    plan = universe_plan(args.universe) if args.universe else {"spot": symbols, "futures": symbols}
    work = Path(tempfile.mkdtemp(prefix="ob-bench-"))
    ports = {m: free_port() for m in plan}
    stats_file = work / "sim-stats.json"
    sim_args = ["--load", "--spot-port", str(ports["spot"]), "--futures-port", str(ports["futures"])]
    if args.universe:
        sim_args += ["--delivery-port", str(ports["delivery"]), "--profile", "universe", "--market-symbols",
                     ",".join(f"{m}={len(s)}" for m, s in plan.items())]
    else:
        sim_args += ["--symbols", ",".join(symbols)]
    if args.profile == "finest":
        sim_args += ["--profile", "finest", "--feed", "sbe"]
    sim_args += ["--writes", args.write_pattern]
    sim = subprocess.Popen([sys.executable, "-m", "simulator", *sim_args, "--stats", str(stats_file)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    crypto = floor = None
    try:
        for port in ports.values():
            wait_port(port)
        groups = [[m] for m in plan] if args.process_per_market else [list(plan)]
        cols, urls, logs = [], [], []
        launched = time.monotonic()
        for i, markets in enumerate(groups):
            cfg, u = write_config(work, {m: ports[m] for m in markets}, plan, args, name=f"config-{i}.ini")
            urls += u
            logs.append(work / f"collector-{i}.log")
            cols.append(subprocess.Popen([sys.executable, str(args.collector / "collector.py"), "--config", str(cfg)],
                                         cwd=work, stderr=open(logs[-1], "wb"),
                                         env={**os.environ, "BINANCE_API_KEY": API_KEY}))
        # start-up (exchangeInfo, connections, first snapshots) is not steady state; with --universe
        # the warm-up lasts at least until every connection is up, and how long that took is a figure
        copies = args.ws_redundancy or int(_COLLECTOR_DEFAULTS["ws_redundancy"])
        expected = sum(-(-len(plan[m]) // args.per_connection) for m in plan) * copies
        startup_s = wait_connected(logs, expected, launched, args.warmup, 180.0 if args.universe else 0.0)
        if args.cryptofeed and args.profile != "finest" and not args.universe:
            crypto = subprocess.Popen([str(args.cryptofeed_python), str(ROOT / "bench" / "cryptofeed_reader.py"),
                                       str(args.seconds), str(CRYPTOFEED_WARMUP), str(ports["spot"]),
                                       str(ports["futures"]), *symbols], stdout=subprocess.PIPE, text=True)
            time.sleep(CRYPTOFEED_WARMUP)  # its window is then the collector's
        if floor_on:
            # the same copies the collector reads: every batch's URL ws_redundancy times
            floor = subprocess.Popen([sys.executable, str(ROOT / "bench" / "floor.py"), str(args.seconds),
                                      *(urls * copies)],
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "BINANCE_API_KEY": API_KEY})
        cpu0, t0, wall0 = sum(cpu_seconds(c.pid) for c in cols), time.monotonic(), time.time_ns() // 1000
        sim0 = cpu_seconds(sim.pid)
        threads0 = {c.pid: thread_cpu(c.pid) for c in cols}
        rss_series = []  # MiB, sampled through the window (a leak shows as a climb)
        while time.monotonic() < t0 + args.seconds:
            time.sleep(min(args.rss_every, max(0.0, t0 + args.seconds - time.monotonic())))
            rss_series.append(round(max(tree_kib(c.pid, "VmRSS") for c in cols) / 1024))
        cpu1, t1, wall1 = sum(cpu_seconds(c.pid) for c in cols), time.monotonic(), time.time_ns() // 1000
        sim1 = cpu_seconds(sim.pid)
        threads1 = {c.pid: thread_cpu(c.pid) for c in cols}
        peaks = [tree_kib(c.pid) for c in cols]  # each collector with its stamp relays
        own_peaks = [peak_rss_kib(c.pid) for c in cols]  # the collector process alone
        for c in cols:
            c.send_signal(signal.SIGTERM)
        rc = max(c.wait(120) for c in cols)
        floor_frames, floor_cpu = (0.0, 0.0)
        if floor is not None:
            floor_frames, floor_cpu = (float(x) for x in floor.communicate(timeout=60)[0].split())
        crypto_updates, crypto_cpu = (0.0, 0.0)
        if crypto is not None:
            crypto_updates, crypto_cpu = (float(x) for x in crypto.communicate(timeout=60)[0].split())
    finally:
        for helper in (crypto, floor):
            if helper is not None and helper.poll() is None:
                helper.kill()
                helper.wait()
        sim.send_signal(signal.SIGTERM)
        sim.wait(30)
    elapsed = t1 - t0
    sent = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    offered = (sum(m.get("offered_per_s", 0.0) for m in sent.values()) if args.universe or args.profile == "finest"
               else n_symbols * 2 * 2 * 10)  # streams x 10 frames/s
    recorded = count_ws_rows(work / "data", wall0, wall1)  # rows received in the window
    texts = [log.read_text() for log in logs]
    queues = [int(q) for text in texts for q in re.findall(r"queue=(\d+)", text)]
    delays = stamp_delays(work / "data", sent, wall0, wall1)
    lost = lost_diffs(work / "data")
    disk, raw = bytes_per_message(work / "data")
    col_us = 1e6 * (cpu1 - cpu0) / max(1, offered * elapsed)
    r = {"offered/s": offered, "recorded/s": recorded / elapsed, "collector_us": col_us,
         "collector_cpu_%": 100 * (cpu1 - cpu0) / elapsed, "simulator_cpu_%": 100 * (sim1 - sim0) / elapsed,
         "peak_rss_MiB": max(peaks) / 1024, "collector_rss_MiB": max(own_peaks) / 1024,
         "max_queue": max(queues or [0]), "last_queue": max(queues[-2 * len(cols):] or [0]),
         **delays, "lost_diffs": lost,
         "disk_B/msg": disk, "zstd19_B/msg": raw, "exit": rc,
         # simulator ticks (10 ms) skipped rather than sent late in a burst, over the whole run
         "sim_skipped_ticks": sum(m.get("skipped_ticks", 0) for m in sent.values()),
         # writes TCP did not take at once (the collector not reading): their frames arrived
         # after the write ended, so late / since_write do not bound their stamps
         "sim_held_writes": sum(m.get("held_writes", 0) for m in sent.values())}
    if args.universe:
        # from launch to every connection up and delivering, and the most REST weight the
        # exchange counted in any minute (per market: its limit is per market)
        r["startup_s"] = startup_s
        for m, stats in sent.items():
            r[f"weight_max_{m}"] = max(stats.get("weight_by_minute", {}).values(), default=0)
    if floor_on:
        floor_us = 1e6 * floor_cpu / max(1, floor_frames / copies)  # a message read as often as the collector does
        r.update({"floor/s": floor_frames / args.seconds, "floor_us": floor_us,
                  "ratio": col_us / floor_us if floor_us else float("nan")})
    if args.cryptofeed and crypto_updates:
        r.update({"cryptofeed/s": crypto_updates / args.seconds, "cryptofeed_us": 1e6 * crypto_cpu / crypto_updates,
                  "vs_cryptofeed": col_us / (1e6 * crypto_cpu / crypto_updates)})
    r["thread_us"] = cpu_by_group({k: v for t in threads0.values() for k, v in t.items()},
                                  {k: v for t in threads1.values() for k, v in t.items()}, offered * elapsed)
    r["queue_series"] = queues
    r["rss_series"] = rss_series
    if args.keep:
        print(f"kept: {work}", file=sys.stderr)
    else:  # a 30-minute run at 2,000 symbols leaves ~3 GB
        shutil.rmtree(work, ignore_errors=True)
    return r

def stamp_delays(root: Path, sent: dict, since_us: int, until_us: int) -> dict[str, float]:
    """How late the diff rows received in the window were stamped, in ms, against the
    simulator's writes of the same frame (found by its E and the connections carrying its
    symbol). On loopback a frame reaches the collector's socket during the write to its
    connection, so a stamp's own error lies between two bounds:
    - late (at least): received_time - the end of that write (of the latest of them, with
      redundant connections), 0 if not after it;
    - since_write (at most): received_time - the start of that write (the earliest);
    - delay: received_time - the moment the simulator began the tick's writes, to every
      connection (what the collector's users would see, the simulator's own time included);
    - sim_write: the end of the frame's write - the tick's start (the simulator's share).
    p50 and p99 of each, and late's p99.9 and maximum."""
    delay, late, since_write, sim_write = [], [], [], []
    for market in MARKET_NAMES:
        stats = sent.get(market, {})
        folder = root / market / "diff_orderbooks"
        if not stats.get("sent_us") or not folder.exists():
            continue
        sent_us = {int(k): v for k, v in stats["sent_us"].items()}
        writes = {int(k): v for k, v in stats.get("writes", {}).items()}
        conns = {sym.upper(): c for sym, c in stats.get("symbol_conns", {}).items()}
        t = ds.dataset(folder, format="parquet").to_table(columns=["received_time", "event_time", "symbol"])
        for rec, e_us, sym in zip(t.column("received_time").to_numpy(), t.column("event_time").to_numpy(),
                                  t.column("symbol").to_pylist(), strict=True):
            e = int(e_us) // 1000  # stored in µs; the load engine's `E` is the ms of its write
            if e not in sent_us or not since_us <= rec < until_us:
                continue
            delay.append(rec - sent_us[e])
            spans = [w for c in conns.get(sym, ()) if (w := writes.get(e, {}).get(str(c)))]
            if spans:
                end = max(w[1] for w in spans)
                late.append(max(0, rec - end))
                since_write.append(rec - min(w[0] for w in spans))
                sim_write.append(end - sent_us[e])
    out = {}
    for name, values in (("delay", delay), ("late", late), ("since_write", since_write), ("sim_write", sim_write)):
        v = np.array(values, dtype=float) / 1000 if values else np.array([np.nan])
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = np.percentile(v, 50), np.percentile(v, 99)
        if name == "late":
            out["late_p99.9_ms"], out["late_max_ms"] = np.percentile(v, 99.9), v.max()
    return {k: round(float(x), 2) for k, x in out.items()}


def lost_diffs(root: Path) -> int:
    n = 0
    for market in MARKET_NAMES:
        folder = root / market / "gaps"
        if folder.exists():
            reasons = ds.dataset(folder, format="parquet").to_table(columns=["reason"]).column("reason")
            n += int(pc.sum(pc.not_equal(reasons, "start")).as_py() or 0)
    return n


def bytes_per_message(root: Path) -> tuple[float, float]:
    """Parquet bytes per diff/partial row, and zstd -19 of the same messages' raw JSON
    (rebuilt from a sample of the rows, as Binance's JSON text, one message per line)."""
    files = [f for m in MARKET_NAMES for k in WS_KINDS for f in (root / m / k).rglob("*.parquet")]
    if not files:
        return float("nan"), float("nan")
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


QUEUE_SIZE = int(_COLLECTOR_DEFAULTS["queue_size"])  # the collector's default, which the bench config keeps


def sustained(r: dict, args: argparse.Namespace) -> bool:
    """Kept up: nothing lost, the queue never half full and not growing at the end, what was
    offered recorded (99.5 %: the window's edges cut a few frames either way)."""
    return (r["lost_diffs"] == 0 and r["exit"] == 0 and r["last_queue"] < args.queue_limit
            and r["max_queue"] < QUEUE_SIZE // 2 and r["recorded/s"] >= 0.995 * r["offered/s"])


SERIES = ("queue_series", "rss_series")
NOT_SCALAR = (*SERIES, "thread_us")  # left out of the scalar figures and their medians


def show(label: str, r: dict) -> None:
    print(f"{label}: " + "  ".join(f"{k}={v:,.1f}" for k, v in r.items() if k not in NOT_SCALAR)
          + "".join(f"  {k}={r[k][::max(1, len(r[k]) // 12)]}" for k in SERIES)
          + f"  thread_us={r['thread_us']}", flush=True)


def run_variants(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Every combination of `--profiles`, `--writes` and `--redundancy`, runs alternating
    (so that a noisy minute does not favour one), then each one's medians and its CPU per
    message against the first."""
    profiles = (args.profiles or "100ms").split(",")
    if set(profiles) - {"100ms", "finest"}:
        p.error(f"--profiles {args.profiles}: each one 100ms or finest")
    writes = args.writes.split(",")
    if set(writes) - set(WRITES):
        p.error(f"--writes {args.writes}: each one of {', '.join(WRITES)}")
    redundancy = [int(x) for x in args.redundancy.split(",")] if args.redundancy else [None]
    variants = [(pr, w, v) for pr in profiles for w in writes for v in redundancy]
    results: dict = {v: [] for v in variants}
    for i in range(args.runs):
        for v in variants:
            args.profile, args.write_pattern, args.ws_redundancy = v
            r = one_run(args, args.symbols, floor_on=not args.no_floor)
            results[v].append(r)
            show(f"run {i + 1} {label(v)}", r)
    medians = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k not in NOT_SCALAR}
               for v, rs in results.items()}
    print(f"{args.symbols} symbols per market, {args.seconds:.0f} s per run, {args.runs} run(s); medians. "
          "CPU and peak RSS are the whole process tree: the collector and every process it started "
          "(its stamp relays), each process's peak summed")
    for v, med in medians.items():
        print(f" {label(v)}:")
        for k, value in med.items():
            print(f"  {k:16} {value:,.2f}")
    for v in variants[1:]:
        print(f"CPU per message, {label(v)} / {label(variants[0])}: "
              f"{medians[v]['collector_us'] / medians[variants[0]]['collector_us']:.2f}")


def label(variant: tuple) -> str:
    profile, writes, redundancy = variant
    return f"{profile} writes={writes} ws_redundancy={redundancy or 'default'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--symbols", type=int, default=50, help="symbols per market")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--warmup", type=float, default=6)
    p.add_argument("--keep", action="store_true", help="keep each run's folder (data, log, config); removed otherwise")
    p.add_argument("--snapshot-interval", type=float, default=60)
    p.add_argument("--per-connection", type=int, default=100, help="symbols per WebSocket connection")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--compression-level", type=int, help="the collector's compression_level (default: its own, 9)")
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples in the window")
    p.add_argument("--no-floor", action="store_true", help="do not run the bare reader beside the collector")
    p.add_argument("--step", help="comma-separated symbol counts: raise the load until the collector falls behind")
    p.add_argument("--queue-limit", type=int, default=20_000, help="step mode: a final queue above this is falling behind")
    p.add_argument("--smoke", action="store_true", help="a short run that fails (exit 1) if anything is lost")
    p.add_argument("--redundancy", help="comma-separated ws_redundancy values run in turn (e.g. 1,2); prints each "
                                        "one's medians and its CPU per message against the first (default: the "
                                        "collector's own ws_redundancy)")
    p.add_argument("--universe", metavar="S,F,D", help="spot, USD-M and COIN-M symbol counts, shaped like the real "
                                                       "exchange (e.g. 1500,550,50); replaces --symbols")
    p.add_argument("--process-per-market", action="store_true", help="one collector process per market")
    p.add_argument("--profiles", help="comma-separated loads run in turn: 100ms (the default streams) and finest "
                                      "(spot SBE 20/50 ms, USD-M every event); medians and CPU per message each")
    p.add_argument("--writes", default="burst",
                   help="comma-separated write patterns run in turn: burst (a connection's frames of a 10 ms tick "
                        "in one write, as the exchange pushes its 100 ms streams) and each (every frame its own "
                        "write, as every-event streams come: each read carries one frame)")
    p.add_argument("--cryptofeed", action="store_true",
                   help=f"also run cryptofeed {CRYPTOFEED} reading the same diff streams once (both markets; not "
                        "with --profiles finest, which it cannot read), installed on first use into "
                        f"{CRYPTOFEED_VENV}")
    p.add_argument("--collector", type=Path, default=ROOT,
                   help="folder of the collector.py to run (e.g. a worktree of an older commit, for a before/after)")
    args = p.parse_args()
    args.ws_redundancy = None
    args.profile = "100ms"
    args.write_pattern = args.writes.split(",")[0]
    if args.cryptofeed:
        args.cryptofeed_python = cryptofeed_python()
    if args.smoke:  # `--profiles finest --smoke`: the finest load's smoke run
        args.symbols, args.seconds, args.warmup = 10, 5, 4
        args.profile = args.profiles or "100ms"
        r = one_run(args, args.symbols, floor_on=True)
        show("smoke", r)
        ok = r["lost_diffs"] == 0 and r["exit"] == 0 and r["recorded/s"] > 0 and r["floor/s"] > 0
        sys.exit(0 if ok else 1)
    if args.step:
        last = None
        for n in (int(x) for x in args.step.split(",")):
            r = one_run(args, n, floor_on=False)
            show(f"step {n} symbols/market", r)
            if not sustained(r, args):
                print(f"fell behind at {n} symbols per market ({r['offered/s']:,.0f} msgs/s offered)")
                break
            last = r
        print(f"last sustained rate: {last['recorded/s']:,.0f} msgs/s" if last else "no step was sustained")
        return
    run_variants(args, p)

if __name__ == "__main__":
    main()
