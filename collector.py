#!/usr/bin/env python3
"""Binance Spot + USD-M order-book recorder.

    collector.py [--config FILE]            run in the foreground (also: `run`)
    collector.py compact [--config FILE]    compact finished days now, then exit
    collector.py upload [--day D]           compact, then upload finished days
    collector.py status                     what the running collector is doing
    collector.py verify [--market M] [--day D] [--json]   prove what can be proven about recorded data
    collector.py report --day D [--market M] [--out DIR]  PNG per market and a text summary
    collector.py export --market M --symbol S --format tardis-l2|tardis-snap25|hftbacktest [--out DIR]
    collector.py check-config [--config F]  validate a config without starting

This module only wires: load config, set up logging and signals, start threads,
wait, stop. See README.md for the thread diagram.
"""
from __future__ import annotations

import os

# Arrow's C++ code (Parquet writers, output buffers) allocates from the process default
# pool, which `pa.set_memory_pool` does not change: only ARROW_DEFAULT_MEMORY_POOL, read
# when pyarrow loads, chooses it. Arrow's bundled jemalloc, told to give freed pages back
# to the kernel within 100 ms (Arrow's own setting keeps them a second, then a second
# more as MADV_FREE pages, which still count as RSS), keeps the column buffers' churn out
# of glibc's heap: peak RSS at 2,000 symbols 270 -> 254 MiB (medians of one-minute
# runs), CPU unchanged (BENCHMARKS.md, eighth session). Set before pyarrow is imported anywhere; an
# operator's own values are left alone.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:100,muzzy_decay_ms:0")

import argparse
import ctypes
import ctypes.util
import gc
import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import requests

import config as config_mod
from handlers.exchange import ExchangeUnavailable, check_symbols, fetch_exchange_info, weight_limit
from handlers.frames import FrameProcessor
from handlers.inbox import Inbox
from handlers.snapshots import Snapshotter, WeightBudget
from handlers.stamped import wall_us
from handlers.websocket import AttemptLimiter, BatchCopies, StreamBatch, combined_url
from service import metrics
from service import status as state_file
from service.logs import setup_logging
from service.loop import MainLoop
from service.threads import name_os_thread
from storage.compact import CompactionFailed, Compactor, compact_all
from storage.files import clean_temp_files
from storage.journal import Journal, journal_dir
from storage.recovery import recover
from storage.writer import STOP, PartWriter

log = logging.getLogger("collector")

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.ini"


now_us = wall_us  # the local clock in µs; readers stamp frames with the kernel's reading of it


def tune_gc() -> None:
    """The processor holds up to a second of parsed frames (many small lists) between
    builds; with the default thresholds the cyclic GC rescans them hundreds of times a
    second, which measured as half the decode cost. Nothing on the hot path makes cycles,
    so: freeze what start-up made, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def tune_memory() -> None:
    """Measured (BENCHMARKS.md): glibc limited to 2 malloc arenas (it would make one per
    thread, and there is a thread per connection) cut peak RSS by a sixth and CPU per
    message by a quarter at 10,000 msgs/s. Must run before the threads start. Arrow's
    buffers have their own allocator: see the top of this file and `check_arrow_pool`."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 2)
        # Buffers up to 16 MiB come from the heap, and up to 16 MiB free at its top stay
        # there: Arrow's ZSTD makes (and frees) a compression workspace of several MiB for
        # every page it compresses; mapped and unmapped each time (or trimmed off the
        # heap and taken back), its pages faulted in again on every page: ZSTD-9 part
        # files cost 7.4 µs a message instead of 4.3 (BENCHMARKS.md, fifth session).
        libc.mallopt(_M_MMAP_THRESHOLD, 16 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 16 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def check_arrow_pool() -> str:
    """The allocator of Arrow's C++ side, logged at start-up. A pyarrow build without
    jemalloc falls back to mimalloc, which held 30-70 MiB more than glibc at 2,000 symbols
    (BENCHMARKS.md, eighth session): then at least the arrays Python builds come from
    glibc, and the log says so."""
    import pyarrow as pa

    name = pa.default_memory_pool().backend_name
    wanted = os.environ["ARROW_DEFAULT_MEMORY_POOL"]
    if name != wanted:
        pa.set_memory_pool(pa.system_memory_pool())
        log.warning("this pyarrow has no %s allocator: Arrow's C++ side uses %s, Python's arrays the system "
                    "allocator; expect a higher RSS", wanted, name)
    else:
        conf = os.environ.get("JE_ARROW_MALLOC_CONF", "") if name == "jemalloc" else ""
        log.info("arrow memory pool: %s%s", name, f" ({conf})" if conf else "")
    return name


@dataclass
class MarketPipeline:
    """Every thread and queue of one market."""

    cfg: config_mod.MarketConfig
    inbox: Inbox
    outbox: queue.Queue
    batches: list[StreamBatch]  # every copy of every batch
    groups: list[BatchCopies]   # the batches, each with its copies
    snapshotter: Snapshotter
    processor: FrameProcessor
    writer: PartWriter

    def start(self) -> None:
        self.writer.start()
        self.processor.start()
        for b in self.batches:
            b.start()
        self.snapshotter.start()

    def connections(self) -> tuple[int, int, list[str]]:
        """(connections live, connections configured, the batches that run on fewer than
        configured as "name:live/n"): the one count the status line, the state file, the
        metrics and systemd's status all show."""
        degraded = []
        live = 0
        for g in self.groups:
            n = g.live()
            live += n
            if n < g.n:
                degraded.append(f"{g.name}:{n}/{g.n}")
        return live, sum(g.n for g in self.groups), degraded

    def status_line(self, last: dict) -> str:
        """One line: rates since the previous call (state kept in `last`), then totals."""
        p, w = self.processor.stats, self.writer.stats
        counts = {**p.frames, "snap": p.snapshots}
        now = time.monotonic()
        elapsed = max(1e-3, now - last.get("_t", now - 1e-3))
        rates = " ".join(f"{k.split('_')[0]}={(v - last.get(k, 0)) / elapsed:.1f}/s" for k, v in counts.items())
        last.update(counts, _t=now)
        live, configured, degraded = self.connections()
        return (f"status market={self.cfg.name} {rates} connections={live}/{configured} "
                f"degraded={','.join(degraded) or 'none'} "
                f"snapshots_ok={self.snapshotter.stats.ok} snapshots_failed={self.snapshotter.stats.failed} "
                f"gaps={p.gaps} duplicates={p.duplicates} malformed={p.malformed} "
                f"queue={self.inbox.qsize()} rows_written={sum(w.rows.values())} "
                f"files={w.files} write_errors={w.errors}")


def build_market(cfg: config_mod.MarketConfig, c: config_mod.CollectorConfig, stop: threading.Event,
                 session: requests.Session, weight_per_minute: int, run_id: int,
                 now_us: Callable[[], int] = now_us) -> MarketPipeline:
    inbox = Inbox(maxsize=c.queue_size)
    outbox: queue.Queue = queue.Queue(maxsize=64)
    m = cfg.market
    batches, groups = [], []
    attempts = AttemptLimiter()
    per, copies = cfg.symbols_per_connection, c.ws_redundancy
    for n, i in enumerate(range(0, len(cfg.symbols), per)):
        streams = []
        for sym in cfg.symbols[i:i + per]:
            streams += [m.diff_stream(sym, cfg.diff_speed), m.partial_stream(sym, cfg.partial_levels, cfg.partial_speed)]
        name = f"ws-{cfg.name}-{n}"
        group = BatchCopies(name, copies, c.ws_rotate_after)
        groups.append(group)
        for k in range(copies):
            batches.append(StreamBatch(name + ("abc"[k] if copies > 1 else ""), combined_url(cfg.ws_url, streams),
                                       inbox, stop, now_us, c.ws_dead_after, c.ws_rotate_after, attempts=attempts,
                                       copies=group, copy=k))
    budget = WeightBudget(weight_per_minute, c.rest_weight_share)
    snapshotter = Snapshotter(cfg, inbox, stop, budget, now_us, session=session)
    journal = Journal(journal_dir(c.data_dir, cfg.name), run_id)
    processor = FrameProcessor(cfg, inbox, outbox, c.flush_interval, now_us, request_snapshot=snapshotter.request,
                               on_server_shutdown=lambda conn: _rotate(batches, conn), journal=journal)
    writer = PartWriter(cfg.name, c.data_dir, outbox, c.compression_level, on_segment_written=journal.delete,
                        now_us=now_us, retry_wait=min(5.0, c.flush_interval), max_pending_bytes=int(c.max_pending_mb * (1 << 20)))
    return MarketPipeline(cfg, inbox, outbox, batches, groups, snapshotter, processor, writer)


def _rotate(batches: list[StreamBatch], conn: int) -> None:
    """serverShutdown on connection `conn`: its supervisor replaces it now."""
    for b in batches:
        if b.reader is not None and b.reader.conn_id == conn:
            b.rotate_now.set()
            return


def resolve_symbols(cfg: config_mod.Config, session: requests.Session, stop: threading.Event):
    """Drop symbols the exchange does not list as trading; (markets, weight limits)."""
    markets, limits = [], {}
    for m in cfg.markets:
        info = fetch_exchange_info(session, m, stop)
        symbols = check_symbols(m, info)
        if not symbols:
            raise config_mod.ConfigError(f"{cfg.path}: [{m.name}] symbols: none of them is trading on the exchange")
        limits[m.name] = weight_limit(info, default=6000 if m.name == "spot" else 2400)
        markets.append(replace(m, symbols=symbols))
    return markets, limits


def stop_all(pipelines: list[MarketPipeline], compactor: Compactor | None) -> bool:
    """Producers stop, snapshot pools drain, processors and writers get sentinels."""
    clean = True

    def join(t: threading.Thread, timeout: float) -> None:
        nonlocal clean
        t.join(timeout)
        if t.is_alive():
            clean = False
            log.error("thread did not stop in %.0fs: %s", timeout, t.name)

    for p in pipelines:
        for b in p.batches:
            join(b, 5)
    for p in pipelines:
        p.snapshotter.shutdown()
        join(p.snapshotter, 5)
    for p in pipelines:
        p.inbox.put(STOP)
    for p in pipelines:
        join(p.processor, 20)
        join(p.writer, 30)
    if compactor is not None:
        join(compactor, 30)
    return clean


def run(cfg: config_mod.Config) -> int:
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    c = cfg.collector
    c.data_dir.mkdir(parents=True, exist_ok=True)
    for leftover in clean_temp_files(c.data_dir):
        log.info("removed unfinished temporary file %s", leftover)
    session = requests.Session()
    try:
        markets, limits = resolve_symbols(cfg, session, stop)
    except config_mod.ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except ExchangeUnavailable as e:
        log.error("%s", e)
        return EXIT_FAIL
    if stop.is_set():
        return EXIT_OK
    for m in markets:
        # before anything new is written: the journal a crash left behind becomes part files
        recovered = recover(m, c.data_dir, c.compression_level, now_us)
        if recovered:
            log.warning("recovered rows from the journal after an unclean stop market=%s rows=%s", m.name, recovered)
    run_id = now_us()
    pipelines = [build_market(m, c, stop, session, limits[m.name], run_id) for m in markets]
    tune_gc()
    tune_memory()
    check_arrow_pool()
    for p in pipelines:
        log.info("recording market=%s symbols=%d connections=%d data_dir=%s",
                 p.cfg.name, len(p.cfg.symbols), len(p.batches), c.data_dir)
        p.start()
    compactor = Compactor(c.data_dir, c.compression_level, stop, now_us, grace_s=c.flush_interval + 20,
                          memory_budget=c.compact_memory_mb << 20)
    compactor.start()
    uploader = UploadJob(cfg, stop) if cfg.upload.enabled else None
    if uploader is not None:
        uploader.start()
        uploader.kick.set()
    if c.metrics_listen:
        try:
            metrics.serve(c.metrics_listen, pipelines, uploader, compactor)
        except OSError as e:  # recording matters more than its metrics
            log.error("metrics endpoint %s not started: %s", c.metrics_listen, e)
    loop = MainLoop(pipelines, cfg, now_us, uploader)
    while not stop.wait(0.5):
        dead = loop.tick()
        if dead:
            log.critical("pipeline thread died: %s; stopping so that systemd restarts us", dead)
            stop.set()
            loop.stopping()
            stop_all(pipelines, compactor)
            return EXIT_FAIL
    loop.stopping()
    clean = stop_all(pipelines, compactor)
    loop.final_status()
    log.info("stopped cleanly" if clean else "stopped; some threads did not finish")
    return EXIT_OK if clean else EXIT_FAIL


def make_uploader(cfg: config_mod.Config, progress: bool = False):
    from storage import upload  # boto3 is only imported when uploads are used

    creds = upload.Credentials.from_env()
    client = upload.make_client(creds, cfg.upload)
    return upload.Uploader(client, creds, cfg.upload, cfg.collector.data_dir, upload.config_hash(cfg.path),
                           progress=progress)


def compact_now(cfg: config_mod.Config) -> bool:
    """`collector.py compact` (and the first step of `upload`), in this process; False if a
    day failed (each is logged, and named in one error line)."""
    try:
        done = compact_all(cfg.collector.data_dir, cfg.collector.compression_level, now_us(),
                           memory_budget=cfg.collector.compact_memory_mb << 20)
    except CompactionFailed as e:
        log.error("%s", e)
        return False
    log.info("compacted %d day folders", done)
    return True


def upload_now(cfg: config_mod.Config, day: str | None, progress: bool) -> int:
    """`collector.py upload`: compact what is finished, then upload it; exit 0 only if all went up."""
    from storage.upload import UploadError

    compacted = compact_now(cfg)  # the other days still go up; failed ones stay as parts
    try:
        results = make_uploader(cfg, progress).run(only_day=day)
    except UploadError as e:
        log.error("%s", e)
        return EXIT_CONFIG if "missing environment" in str(e) else EXIT_FAIL
    log.info("upload done uploaded=%d skipped=%d deleted=%d failed_days=%s", results["uploaded"],
             results["skipped"], results["deleted"], ",".join(results["days_failed"]) or "none")
    return EXIT_FAIL if results["days_failed"] or not compacted else EXIT_OK


class UploadJob(threading.Thread):
    """The service's periodic upload run (every `every_minutes`), off the main thread."""

    def __init__(self, cfg: config_mod.Config, stop: threading.Event):
        super().__init__(name="uploader", daemon=True)
        self.cfg, self.stop, self.kick = cfg, stop, threading.Event()
        self.last: dict = {}
        self.totals: dict[str, int] = {}

    def run(self) -> None:
        name_os_thread()
        from storage.upload import UploadError

        while not self.stop.is_set():
            if self.kick.wait(1.0):
                self.kick.clear()
                try:
                    self.last = make_uploader(self.cfg).run()
                    for k in ("uploaded", "skipped", "deleted"):
                        self.totals[k] = self.totals.get(k, 0) + self.last[k]
                    if self.last["days_failed"]:
                        log.error("upload: days still not uploaded: %s", ", ".join(self.last["days_failed"]))
                except UploadError as e:
                    log.error("%s", e)
                except Exception:
                    log.error("upload run failed; retried at the next run", exc_info=True)


def report_now(cfg: config_mod.Config, args) -> int:
    from tools.report import report

    if not args.day:
        log.error("report needs --day YYYY-MM-DD")
        return EXIT_CONFIG
    for m in [args.market] if args.market else [m.name for m in cfg.markets]:
        png, summary, _ = report(cfg.collector.data_dir, m, args.day, Path(args.out))
        print(summary)
        print(f"plot: {png}")
    return EXIT_OK


def export_now(cfg: config_mod.Config, args) -> int:
    from tools.export import EXPORTS

    if not (args.market and args.symbol and args.format):
        log.error("export needs --market, --symbol and --format")
        return EXIT_CONFIG
    fn, suffix = EXPORTS[args.format]
    out = Path(args.out) / f"{args.market}-{args.symbol}-{args.format}{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    n = fn(cfg.collector.data_dir, args.market, args.symbol.upper(), out)
    print(f"{out}: {n} rows")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="collector.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="run",
                        choices=["run", "compact", "check-config", "upload", "status", "verify", "report", "export"])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="config.ini (default: %(default)s)")
    parser.add_argument("--day", help="upload, verify: only this day (YYYY-MM-DD)")
    parser.add_argument("--market", choices=["spot", "futures"], help="verify: only this market")
    parser.add_argument("--json", action="store_true", help="verify: the report as JSON")
    parser.add_argument("--symbol", help="export: the symbol")
    parser.add_argument("--format", choices=["tardis-l2", "tardis-snap25", "hftbacktest"], help="export: the format")
    parser.add_argument("--out", default=".", help="report, export: output folder (default: current folder)")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.collector.log_level)
    if args.command == "check-config":
        print(f"{cfg.path}: ok ({', '.join(f'{m.name}: {len(m.symbols)} symbols' for m in cfg.markets)})")
        return EXIT_OK
    if args.command == "report":
        return report_now(cfg, args)
    if args.command == "export":
        return export_now(cfg, args)
    if args.command == "verify":
        from tools import verify

        markets = [args.market] if args.market else [m.name for m in cfg.markets]
        return verify.main(cfg.collector.data_dir, markets, args.day, args.json)
    if args.command == "status":
        text, running = state_file.render(cfg.collector.data_dir)
        print(text)
        return EXIT_OK if running else EXIT_FAIL
    if args.command == "upload":
        return upload_now(cfg, args.day, progress=sys.stderr.isatty())
    if args.command == "compact":
        return EXIT_OK if compact_now(cfg) else EXIT_FAIL
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
