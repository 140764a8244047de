"""A market's pipeline: every thread and queue that records it, built from the config,
the changes of its symbol set while running, and the order in which they stop.

    readers (ws-<market>-<batch><copy>) ─┐
    snapshot-<market> (REST pool) ───────┼─► inbox ─► processor-<market> ─► writer-<market> ─► part files
    listings-<market> (symbol set) ──────┘  (and SUBSCRIBE / UNSUBSCRIBE through the batches)
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import requests

import config as config_mod
from handlers import exchange
from handlers.clock import ClockSampler
from handlers.frames import FrameProcessor
from handlers.inbox import SYMBOLS, Inbox
from handlers.listings import ListingWatcher, Removed
from handlers.relay import StampRelay
from handlers.snapshots import Snapshotter, WeightBudget
from handlers.timestamps import wall_us
from handlers.websocket import AttemptLimiter, BatchCopies, StreamBatch
from service.counters import Counters
from storage.compact import Compactor
from storage.journal import Journal, journal_dir
from storage.writer import STOP, PartWriter

log = logging.getLogger("collector")

now_us = wall_us  # the local clock in µs; readers stamp frames with the kernel's reading of it


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
    collector: config_mod.CollectorConfig
    stop: threading.Event
    attempts: AttemptLimiter
    now_us: Callable[[], int]
    symbols: list[str] = field(default_factory=list)   # recorded now (the set changes with listings)
    watcher: ListingWatcher | None = None
    clock: ClockSampler | None = None
    relays: list[StampRelay] = field(default_factory=list)  # one per copy of a batch: read its connections
    _changing: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.writer.start()
        self.processor.start()
        for b in self.batches:
            b.start()
        self.snapshotter.start()
        if self.watcher is not None:
            self.watcher.start()
        if self.clock is not None:
            self.clock.start()

    def threads(self) -> list[threading.Thread]:
        """Every thread whose death stops the collector."""
        threads: list[threading.Thread] = [self.processor, self.writer]
        return threads + [t for t in (self.watcher, self.clock) if t is not None]

    def streams_of(self, symbol: str) -> list[str]:
        cfg, m = self.cfg, self.cfg.market
        return [m.diff_stream(symbol, cfg.diff_speed), m.partial_stream(symbol, cfg.partial_levels, cfg.partial_speed)]

    def new_batch(self, streams: list[str]) -> BatchCopies:
        """A batch of streams with its `ws_redundancy` copies (started if the pipeline runs)."""
        c, cfg = self.collector, self.cfg
        name = f"ws-{cfg.name}-{len(self.groups)}"
        group = BatchCopies(name, c.ws_redundancy, c.ws_rotate_after, ws_url=cfg.ws_url, streams=streams,
                            capacity=2 * cfg.symbols_per_connection)
        for k in range(c.ws_redundancy):
            copy = StreamBatch(name + ("abc"[k] if c.ws_redundancy > 1 else ""), group, self.inbox, self.stop,
                               self.now_us, c.ws_dead_after, c.ws_rotate_after, attempts=self.attempts, copy=k,
                               relay=self.relays[k] if self.relays else None)
            self.batches.append(copy)
            if self.processor.is_alive():
                copy.start()
        self.groups.append(group)
        return group

    def change_symbols(self, added: list[str], removed: Removed) -> None:
        """The symbol set changes while running (from the listings thread), without touching
        the other symbols' connections.
        - Added: routed by the processor first, then subscribed on a batch with room (every
          copy of it, by SUBSCRIBE), or on a new batch; scheduled for snapshots. Its first
          diff starts its record (a `start` row, and a snapshot at once).
        - Removed: unsubscribed and unscheduled; once every copy has left its streams (at
          most 5 s), the processor ends its record with a `gaps` row naming the reason."""
        with self._changing:
            if added:
                self.inbox.put((SYMBOLS, self.now_us(), (tuple(added), ())))
                streams = [s for sym in added for s in self.streams_of(sym)]
                for group in self.groups:
                    if not streams:
                        break
                    take = group.room() // 2 * 2
                    if take > 0 and group.streams:
                        group.change(add=streams[:take])
                        streams = streams[take:]
                per = 2 * self.cfg.symbols_per_connection
                for i in range(0, len(streams), per):
                    self.new_batch(streams[i:i + per])
                for sym in added:
                    self.snapshotter.add(sym)
                self.symbols += [s for s in added if s not in self.symbols]
            if removed:
                gone = {sym for sym, _ in removed}
                drop = [s for sym in gone for s in self.streams_of(sym)]
                for group in self.groups:
                    group.change(drop=drop)
                for sym in gone:
                    self.snapshotter.remove(sym)
                deadline = time.monotonic() + 5.0
                while not all(g.in_line() for g in self.groups) and time.monotonic() < deadline:
                    self.stop.wait(0.1)
                self.stop.wait(1.0)  # frames already on their way
                self.inbox.put((SYMBOLS, self.now_us(), ((), tuple(removed))))
                self.symbols = [s for s in self.symbols if s not in gone]

    def counters(self) -> Counters:
        """Every counter of this market's threads, at this moment."""
        p, w, ss, batches = self.processor.stats, self.writer.stats, self.snapshotter.stats, self.batches
        live_by_group = [(g, g.live()) for g in self.groups if g.streams]
        groups = [(g.name, live, g.n) for g, live in live_by_group]
        return Counters(
            market=self.cfg.name, symbols=len(self.symbols), streams=sum(len(g.streams) for g, _ in live_by_group),
            streams_live=sum(len(g.streams) for g, live in live_by_group if live),
            connections_live=sum(live for _, live, _ in groups), connections=sum(n for _, _, n in groups),
            degraded=tuple(f"{name}:{live}/{n}" for name, live, n in groups if live < n),
            batches=tuple(groups), last_data_us=tuple((b.name, b.stats.last_frame_us) for b in batches),
            connects=sum(b.stats.connects for b in batches), rotations=sum(b.stats.rotations for b in batches),
            dead=sum(b.stats.dead for b in batches), last_attempt=max((b.stats.last_attempt for b in batches), default=0.0),
            frames=dict(p.frames), gaps=p.gaps, gaps_by_reason=dict(p.gaps_by_reason), duplicates=p.duplicates,
            malformed=p.malformed, queue=self.inbox.qsize(), rows_written=dict(w.rows), files=w.files,
            bytes_written=w.bytes, write_errors=w.errors, rows_lost=w.lost_rows, snapshot_rows=p.snapshots,
            snapshots_ok=ss.ok, snapshots_failed=ss.failed, snapshots_rate_limited=ss.rate_limited,
            snapshot_latency_sum=ss.latency_sum, last_snapshot_us=ss.last_ok_us, snapshot_interval=ss.interval,
            clock_synced=self.clock.stats.synced if self.clock else None,
            clock_offset_us=self.clock.stats.offset_us if self.clock else None,
            clock_rtt_us=self.clock.stats.rtt_us if self.clock else None,
            clock_max_error_us=self.clock.stats.max_error_us if self.clock else None,
            weight_used=self.snapshotter.budget.used, weight_cap=self.snapshotter.budget.cap,
            processor_heartbeat=p.heartbeat, writer_heartbeat=w.heartbeat)

    def status_line(self, last: dict) -> str:
        """One line: rates since the previous call (state kept in `last`), then totals."""
        c = self.counters()
        counts = {**c.frames, "snap": c.snapshot_rows}
        now = time.monotonic()
        elapsed = max(1e-3, now - last.get("_t", now - 1e-3))
        rates = " ".join(f"{k.split('_')[0]}={(v - last.get(k, 0)) / elapsed:.1f}/s" for k, v in counts.items())
        last.update(counts, _t=now)
        return (f"status market={c.market} {rates} connections={c.connections_live}/{c.connections} "
                f"degraded={','.join(c.degraded) or 'none'} "
                f"snapshots_ok={c.snapshots_ok} snapshots_failed={c.snapshots_failed} "
                f"gaps={c.gaps} duplicates={c.duplicates} malformed={c.malformed} "
                f"queue={c.queue} rows_written={sum(c.rows_written.values())} "
                f"files={c.files} write_errors={c.write_errors}")


def build_market(cfg: config_mod.MarketConfig, c: config_mod.CollectorConfig, stop: threading.Event,
                 session: requests.Session, weight_per_minute: int, run_id: int,
                 now_us: Callable[[], int] = now_us, trading: set[str] | None = None,
                 clock: Callable[[], float] = time.time, relays: list[StampRelay] | None = None) -> MarketPipeline:
    """`trading`: what traded at start (the listings thread's first reference); the
    listings thread runs when `listing_check` > 0 and `trading` is given."""
    inbox = Inbox(maxsize=c.queue_size)
    outbox: queue.Queue = queue.Queue(maxsize=64)
    batches: list[StreamBatch] = []
    budget = WeightBudget(weight_per_minute, c.rest_weight_share)
    snapshotter = Snapshotter(cfg, inbox, stop, budget, now_us, session=session)
    journal = Journal(journal_dir(c.data_dir, cfg.name), run_id)
    processor = FrameProcessor(cfg, inbox, outbox, c.flush_interval, now_us, request_snapshot=snapshotter.request,
                               on_server_shutdown=lambda conn: _rotate(batches, conn), journal=journal)
    writer = PartWriter(cfg.name, c.data_dir, outbox, c.compression_level, on_segment_written=journal.delete,
                        now_us=now_us, retry_wait=min(5.0, c.flush_interval), max_pending_bytes=int(c.max_pending_mb * (1 << 20)))
    p = MarketPipeline(cfg, inbox, outbox, batches, [], snapshotter, processor, writer, c, stop, AttemptLimiter(),
                       now_us, symbols=list(cfg.symbols), relays=relays or [])
    per = cfg.symbols_per_connection
    for i in range(0, len(cfg.symbols), per):
        p.new_batch([s for sym in cfg.symbols[i:i + per] for s in p.streams_of(sym)])
    p.clock = ClockSampler(cfg, inbox, stop, budget, now_us, session, max_offset_ms=c.clock_max_offset_ms)
    if cfg.listing_check > 0 and trading is not None:
        p.watcher = ListingWatcher(cfg, lambda: p.symbols, trading, session, budget, stop, p.change_symbols,
                                   clock=clock)
    return p


def _rotate(batches: list[StreamBatch], conn: int) -> None:
    """serverShutdown on connection `conn`: its supervisor replaces it now."""
    for b in batches:
        if b.reader is not None and b.reader.conn_id == conn:
            b.rotate_now.set()
            return


@dataclass(frozen=True)
class Resolved:
    """A market as the exchange lists it at start."""

    cfg: config_mod.MarketConfig    # its `symbols` the set to record
    weight_limit: int               # REQUEST_WEIGHT per minute
    trading: set[str]               # every symbol trading at start


def resolve_symbols(cfg: config_mod.Config, session: requests.Session, stop: threading.Event) -> list[Resolved]:
    """Each market's symbol set from exchangeInfo (and, for `top N`, the 24h volumes): a
    listed symbol that does not trade is named in one error line and left out."""
    out = []
    for m in cfg.markets:
        info = exchange.fetch_exchange_info(session, m, stop)
        if m.selection == "list":
            symbols = exchange.select(replace(m, symbols=exchange.check_symbols(m, info)), info, None)
        else:
            volumes = exchange.fetch_volumes(session, m, stop) if m.selection == "top" else None
            symbols = exchange.select(m, info, volumes)
            log.info("[%s] symbols = %s%s: %d symbols", m.name, "all" if m.selection == "all" else f"top {m.top_n}",
                     f" quoted in {','.join(m.quote_assets)}" if m.quote_assets else "", len(symbols))
        if not symbols:
            where = f" in shard {m.shard[0]}/{m.shard[1]}" if m.shard[1] > 1 else ""
            raise config_mod.ConfigError(f"{cfg.path}: [{m.name}] symbols: none of them is trading on the exchange{where}")
        limit = exchange.weight_limit(info, default=m.market.default_weight_limit)
        out.append(Resolved(replace(m, symbols=symbols), limit, exchange.trading_symbols(info)))
    return out


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
        for b in list(p.batches):
            join(b, 5)
        for t in (p.watcher, p.clock):
            if t is not None:
                join(t, 10)
    for relay in {id(r): r for p in pipelines for r in p.relays}.values():
        relay.close()  # every reader has ended
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
