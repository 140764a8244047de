"""Replay throughput, pacing and memory: `collector.py replay` of a recorded day to one
client, in a process of its own, measured from outside.

    .venv/bin/python bench/replay.py DATA [--day D] [--pace-speed 1] [--no-pace | --no-throughput]

DATA is a data_dir, e.g. a kept bench run (`bench/run.py --symbols 1000 --seconds 60
--no-floor --redundancy 1 --keep`, then `<kept>/data`). The client subscribes every
recorded symbol's diff and partial stream of every market (combined streams, 100 a
connection, one event loop; aiohttp's compiled reader, receive and discard) before the replay
clock starts (`--start-delay 3`), then:

1. **throughput**, speed 0: frames the client received, over the time from its first to
   its last frame; the replay's own count; the replay's CPU and peak RSS (VmHWM) and the
   time it took to put the day in order. The baseline, in the same run: the same day
   ordered and every frame rendered in one process with nothing sent (`--floor`), so the
   ratio is the cost of serving.
2. **pacing**, speed `--pace-speed` (1: real time, as long as the recorded day): the
   replay's log line, how late frames left against their schedule (p50, p99, max).

`--first-frame` measures instead how long a selection takes to start: from launching
`collector.py replay` to the first frame a client (subscribed as soon as the ports are
up, `--start-delay 0`) receives, for the whole day (the baseline, in the same run), one
symbol, and the first 100 symbols over the middle third of the day (`--from`/`--to`;
`--window S`: S seconds in the middle of the day instead; bench/longer_day.py makes a
day with an hour in it),
each run in a process of its own with its CPU and peak RSS.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from markets import MARKETS  # noqa: E402

PER_CONNECTION = 100  # symbols (two streams each) a connection


def recorded(data: Path, day: str | None) -> tuple[str, dict[str, list[str]], dict[str, int]]:
    """(day, market -> symbols, market -> partial levels) of the tree."""
    days = sorted({p.name.removesuffix(".parquet") for p in data.glob("*/diff_orderbooks/*")})
    day = day or days[-1]
    symbols, levels = {}, {}
    for m in MARKETS:
        files = sorted((data / m / "diff_orderbooks").glob(f"{day}*")) + sorted(
            (data / m / "diff_orderbooks" / day).glob("*.parquet"))
        files = [f for f in files if f.is_file()]
        if not files:
            continue
        symbols[m] = sorted(set(ds.dataset(files).to_table(columns=["symbol"]).column("symbol").to_pylist()))
        parts = sorted((data / m / "partial_orderbooks" / day).glob("*.parquet"))[:1] + sorted(
            (data / m / "partial_orderbooks").glob(f"{day}.parquet"))
        if parts:
            first = ds.dataset(parts[0]).head(1).column("bid_prices").to_pylist()[0]
            levels[m] = next(n for n in (5, 10, 20) if n >= len(first))
    return day, symbols, levels


class Replay:
    def __init__(self, data: Path, day: str, speed: float, markets: list[str], work: Path, *extra: str,
                 start_delay: float = 3.0):
        self.log_path = work / f"replay-{speed:g}-{len(list(work.glob('replay-*')))}.log"
        self.log_file = open(self.log_path, "wb")
        ports = [a for m in markets for a in (f"--{m}-port", "0")]
        if "futures" not in markets:
            ports += ["--futures-port", "0"]
        if "spot" not in markets:
            ports += ["--spot-port", "0"]
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "collector.py"), "replay", "--data", str(data),
                                      "--day", day, "--speed", str(speed), "--start-delay", str(start_delay),
                                      *ports, *extra],
                                     stderr=self.log_file, stdout=subprocess.DEVNULL)
        self.urls: dict[str, str] = {}
        deadline = time.monotonic() + 600
        while len(self.urls) < len(markets):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"replay did not start:\n{self.log}")
            self.urls = dict(re.findall(r"replay market=(\w+) ws_url=(\S+)", self.log))
            time.sleep(0.2)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        found = re.search(r"VmHWM:\s+(\d+)", status)
        return int(found.group(1)) / 1024 if found else 0.0

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log_file.close()


def client(urls: list[str], replay: Replay) -> tuple[int, float]:
    """Read every URL (aiohttp's compiled frame reader, one event loop: a websocket-client
    thread per connection could not read faster than ~30,000 frames/s here) until the
    replay is done and 2 s pass quietly: (frames, seconds from the first frame to the last)."""
    import asyncio

    import aiohttp

    first: list[float] = []
    last = [0.0]
    count = [0]

    async def read(session: aiohttp.ClientSession, url: str) -> None:
        async with session.ws_connect(url, max_msg_size=0, autoping=True) as ws:
            while True:
                try:
                    msg = await ws.receive(timeout=2)
                except asyncio.TimeoutError:
                    if "done:" in replay.log:
                        return
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                if not first:
                    first.append(time.monotonic())
                count[0] += 1
                if count[0] % 1024 == 0:
                    last[0] = time.monotonic()

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(read(session, u) for u in urls))

    asyncio.run(main())
    return count[0], (last[0] or time.monotonic()) - (first[0] if first else 0.0)


def urls_of(replay: Replay, symbols: dict[str, list[str]], levels: dict[str, int]) -> list[str]:
    out = []
    for m, names in symbols.items():
        base = replay.urls[m]
        for i in range(0, len(names), PER_CONNECTION):
            streams = []
            for s in names[i:i + PER_CONNECTION]:
                streams.append(f"{s.lower()}@depth@100ms")
                if m in levels:
                    streams.append(f"{s.lower()}@depth{levels[m]}@100ms")
            out.append(f"{base}/stream?streams=" + "/".join(streams))
    return out


def floor(data: Path, day: str) -> tuple[int, float, float]:
    """The baseline: order the day and render every frame in one process, nothing sent:
    (frames, seconds, peak RSS MiB)."""
    code = f"""
import resource, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from markets import MARKETS
from serve import replay as r
from storage.merge import open_source
t0 = time.monotonic()
with tempfile.TemporaryDirectory() as tmp:
    day = r.order_day(open_source({str(data)!r}), {day!r}, list(MARKETS.values()), Path(tmp))
    rp = r.Replay(day, {day!r}, 0)
    n = 0
    for pieces in r.merged(day.runs):
        for source, cols, rows, _ in rp._ordered(day, pieces):
            market, kind = day.sources[source]
            if kind == r.SNAPSHOTS:
                continue
            for i in rows:
                rp._payload(market, kind, cols, i, 0)
                n += 1
print(n, time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def throughput(data: Path, day: str, symbols: dict[str, list[str]], levels: dict[str, int], tmp: Path) -> None:
    n_floor, s_floor, rss_floor = floor(data, day)
    print(f"baseline (order + render, nothing sent): {n_floor} frames in {s_floor:.1f}s, "
          f"{n_floor / s_floor:,.0f} frames/s, peak RSS {rss_floor:.0f} MiB", flush=True)
    rp = Replay(data, day, 0, list(symbols), tmp)
    try:
        n, secs = client(urls_of(rp, symbols, levels), rp)
        rss, cpu = rp.peak_rss_mib(), rp.cpu_s()
    finally:
        rp.stop()
    ordered = re.search(r"ordered in ([\d.]+)s", rp.log)
    done = re.search(r"done: (\d+) frames sent in ([\d.]+)s \(([\d.]+) frames/s\)", rp.log)
    print(f"speed 0: the client read {n} frames in {secs:.1f}s: {n / max(secs, 1e-9):,.0f} frames/s "
          f"({n / max(secs, 1e-9) / (n_floor / s_floor):.2f}x the baseline); replay says "
          f"{done.group(1) if done else '?'} frames in {done.group(2) if done else '?'}s; ordering "
          f"{ordered.group(1) if ordered else '?'}s; replay CPU {cpu:.1f}s ({cpu * 1e6 / max(n, 1):.1f} µs a frame), "
          f"peak RSS {rss:.0f} MiB", flush=True)


def first_frame(data: Path, day: str, symbols: dict[str, list[str]], tmp: Path, window_s: float | None) -> None:
    """Seconds from launch to the first frame, per selection (see the module's doc)."""
    import asyncio

    import aiohttp
    import pyarrow.compute as pc

    times = ds.dataset(sorted((data / "spot" / "diff_orderbooks").glob(f"{day}*.parquet")) or
                       sorted((data / "spot" / "diff_orderbooks" / day).glob("*.parquet"))).to_table(
        columns=["received_time"]).column("received_time")
    lo, hi = (v.as_py() for v in pc.min_max(times).values())
    length = (hi - lo) // 3 if window_s is None else min(int(window_s * 1e6), hi - lo)
    start = lo + (hi - lo - length) // 2  # the window in the middle of the day
    clock = lambda us: time.strftime("%H:%M:%S", time.gmtime(us / 1e6))  # noqa: E731
    window = (clock(start), clock(start + length))
    names = sorted(set().union(*symbols.values()))
    cases = [("whole day (baseline)", [], names[:1]),
             ("1 symbol, the whole day", ["--symbols", names[0]], names[:1]),
             (f"100 symbols, {window[0]}-{window[1]}",
              ["--symbols", ",".join(names[:100]), "--from", window[0], "--to", window[1]], names[:100])]
    print(f"the day's spot diffs: {clock(lo)} to {clock(hi)} ({(hi - lo) / 1e6:.0f} s, {len(times):,} rows)")
    for label, extra, wanted in cases:
        began = time.monotonic()
        rp = Replay(data, day, 1.0, list(symbols), tmp, *extra, start_delay=0)

        async def first(rp: Replay = rp, wanted: list[str] = wanted) -> float:
            async with aiohttp.ClientSession() as session:
                streams = "/".join(f"{s.lower()}@depth@100ms" for s in wanted[:PER_CONNECTION])
                async with session.ws_connect(f"{rp.urls[list(symbols)[0]]}/stream?streams={streams}") as ws:
                    await ws.receive(timeout=600)
                    return time.monotonic()

        try:
            got = asyncio.run(first())
            rss, cpu = rp.peak_rss_mib(), rp.cpu_s()
        finally:
            rp.stop()
        ordered = re.search(r"ordered in ([\d.]+)s: (.*?); symbols", rp.log)
        print(f"{label}: first frame {got - began:.1f}s after launch (ordering "
              f"{ordered.group(1) if ordered else '?'}s: {ordered.group(2) if ordered else '?'}); "
              f"CPU {cpu:.1f}s, peak RSS {rss:.0f} MiB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--day")
    p.add_argument("--pace-speed", type=float, default=1.0)
    p.add_argument("--no-pace", action="store_true", help="only the throughput at speed 0")
    p.add_argument("--no-throughput", action="store_true", help="only the pacing")
    p.add_argument("--first-frame", action="store_true", help="only the time to the first frame of selections")
    p.add_argument("--window", type=float, help="--first-frame: the 100-symbol window, seconds (default: a third)")
    args = p.parse_args()
    day, symbols, levels = recorded(args.data, args.day)
    print(f"day {day}: " + ", ".join(f"{m} {len(s)} symbols" for m, s in symbols.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="ob-replay-bench-") as tmp:
        if args.first_frame:
            first_frame(args.data, day, symbols, Path(tmp), args.window)
            return
        if not args.no_throughput:
            throughput(args.data, day, symbols, levels, Path(tmp))
        if not args.no_pace:
            rp = Replay(args.data, day, args.pace_speed, list(symbols), Path(tmp))
            try:
                n, secs = client(urls_of(rp, symbols, levels), rp)
                rss = rp.peak_rss_mib()
            finally:
                rp.stop()
            pacing = re.search(r"pacing: (.*)", rp.log)
            print(f"speed {args.pace_speed:g}: {n} frames in {secs:.1f}s; {pacing.group(1) if pacing else '?'}; "
                  f"peak RSS {rss:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
