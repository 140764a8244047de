"""A market's pipeline: every thread and queue that records it, built from the config and
handed to the supervisor (`service.supervisor`, which starts, watches and stops them), and
the changes of its symbol set while running.

    readers (ws-<market>-<batch><copy>) ─┐
    snapshot-<market> (REST pool) ───────┼─► inbox ─► processor-<market> ─► writer-<market> ─► part files
    listings-<market> (symbol set) ──────┘  (and SUBSCRIBE / UNSUBSCRIBE through the batches)
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import requests

import config as config_mod
from handlers.ingest.inbox import SYMBOLS, Inbox
from handlers.ingest.relay import StampRelay
from handlers.ingest.timestamps import wall_us
from handlers.ingest.websocket import AttemptLimiter, BatchCopies, StreamBatch, copy_name
from handlers.process.processor import FrameProcessor
from handlers.rest.clock import ClockSampler
from handlers.rest.listings import ListingWatcher, Removed
from handlers.rest.snapshots import Snapshotter, WeightBudget
from service.counters import Counters
from service.supervisor import Supervisor
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
    supervisor: Supervisor | None = None
    headers: tuple[str, ...] = ()  # of every connection's handshake (SBE: the API key; never logged)
    relays: list[StampRelay] = field(default_factory=list)  # relay k reads copy k of every batch
    _changing: threading.Lock = field(default_factory=threading.Lock)  # one symbol change at a time
    _lists: threading.Lock = field(default_factory=threading.Lock)     # `batches` and `groups` as they grow

    def supervise(self, supervisor: Supervisor) -> None:
        """Hand every thread to the supervisor, each in its stage (its docstring has the order)."""
        self.supervisor = supervisor
        supervisor.add("writer", self.writer, on_stop=self._stop_writer)
        supervisor.add("processor", self.processor, on_stop=lambda: self.inbox.put(STOP))
        supervisor.add("snapshots", self.snapshotter, on_stop=self.snapshotter.shutdown)
        for b in self.batches:
            supervisor.add("readers", b)
        if self.clock is not None:
            supervisor.add("clock", self.clock)
        if self.watcher is not None:
            supervisor.add("listings", self.watcher)

    def _stop_writer(self) -> None:
        """The processor hands the writer its STOP once it has drained; one that died or hung
        cannot, so the writer gets it here, to write what it holds."""
        if self.processor.failed or self.processor.is_alive():
            self.outbox.put(STOP)

    def new_batch(self, streams: list[str]) -> BatchCopies:
        """A batch of streams with its `ws_redundancy` copies (started if the pipeline runs)."""
        c, cfg = self.collector, self.cfg
        name = f"ws-{cfg.name}-{len(self.groups)}"
        group = BatchCopies(name, c.ws_redundancy, c.ws_rotate_after, ws_url=cfg.ws_url, streams=streams,
                            capacity=2 * cfg.symbols_per_connection, query=cfg.ws_query, headers=self.headers)
        for k in range(c.ws_redundancy):
            copy = StreamBatch(copy_name(name, k, c.ws_redundancy), group, self.inbox, self.stop,
                               self.now_us, c.ws_dead_after, c.ws_rotate_after, attempts=self.attempts, copy=k,
                               relay=self.relays[k] if self.relays else None)
            with self._lists:
                self.batches.append(copy)
            if self.supervisor is not None:
                self.supervisor.add("readers", copy)  # started now if the pipeline runs; refused once stopping
        with self._lists:
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
                streams = [s for sym in added for s in self.cfg.streams_of(sym)]
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
                drop = [s for sym in gone for s in self.cfg.streams_of(sym)]
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

    def _journal_bytes(self) -> int:
        journal = self.processor.journal
        if journal is None:
            return 0
        total = 0
        for f in list(journal.folder.glob("seg-*")):
            try:
                total += f.stat().st_size
            except OSError:
                pass  # deleted meanwhile: its segment was written
        return total

    def counters(self) -> Counters:
        """Every counter of this market's threads, at this moment."""
        p, w, ss = self.processor.stats, self.writer.stats, self.snapshotter.stats
        with self._lists:
            batches, all_groups = list(self.batches), list(self.groups)
        live_by_group = [(g, g.live()) for g in all_groups if g.streams]
        groups = [(g.name, live, g.n) for g, live in live_by_group]
        return Counters(
            market=self.cfg.name, symbols=len(self.symbols), streams=sum(len(g.streams) for g, _ in live_by_group),
            streams_live=sum(len(g.streams) for g, live in live_by_group if live),
            connections_live=sum(live for _, live, _ in groups), connections=sum(n for _, _, n in groups),
            degraded=tuple(f"{name}:{live}/{n}" for name, live, n in groups if live < n),
            batches=tuple(groups), last_data_us=tuple((b.name, b.stats.last_frame_us) for b in batches),
            connects=sum(b.stats.connects for b in batches), rotations=sum(b.stats.rotations for b in batches),
            dead=sum(b.stats.dead for b in batches), relay_fallback=sum(b.fallen_back() for b in batches),
            last_attempt=max((b.stats.last_attempt for b in batches), default=0.0),
            frames=dict(p.frames), gaps=p.gaps, gaps_by_reason=dict(p.gaps_by_reason), duplicates=p.duplicates,
            malformed=p.malformed, queue=self.inbox.qsize(), rows_written=dict(w.rows), files=w.files,
            bytes_written=w.bytes, write_errors=w.errors, rows_lost=w.lost_rows, snapshot_rows=p.snapshots,
            pending_bytes=w.pending_bytes, journal_bytes=self._journal_bytes(),
            snapshots_ok=ss.ok, snapshots_failed=ss.failed, snapshots_rate_limited=ss.rate_limited,
            snapshot_latency_sum=ss.latency_sum, last_snapshot_us=ss.last_ok_us, snapshot_interval=ss.interval,
            clock_synced=self.clock.stats.synced if self.clock else None,
            clock_offset_us=self.clock.stats.offset_us if self.clock else None,
            clock_rtt_us=self.clock.stats.rtt_us if self.clock else None,
            clock_max_error_us=self.clock.stats.max_error_us if self.clock else None,
            weight_used=self.snapshotter.budget.used, weight_cap=self.snapshotter.budget.cap,
            coverage=self.processor.coverage.ratio(self.processor.now_us()), receive_delay=p.receive_delay,
            processor_heartbeat=p.heartbeat, writer_heartbeat=w.heartbeat)


def build_market(cfg: config_mod.MarketConfig, c: config_mod.CollectorConfig, stop: threading.Event,
                 session: requests.Session, weight_per_minute: int, run_id: int,
                 now_us: Callable[[], int] = now_us, trading: set[str] | None = None,
                 clock: Callable[[], float] = time.time, relays: list[StampRelay] | None = None,
                 supervisor: Supervisor | None = None, headers: tuple[str, ...] = ()) -> MarketPipeline:
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
                       now_us, symbols=list(cfg.symbols), relays=relays or [], headers=headers)
    per = cfg.symbols_per_connection
    for i in range(0, len(cfg.symbols), per):
        p.new_batch([s for sym in cfg.symbols[i:i + per] for s in cfg.streams_of(sym)])
    p.clock = ClockSampler(cfg, inbox, stop, budget, now_us, session, max_offset_ms=c.clock_max_offset_ms)
    if cfg.listing_check > 0 and trading is not None:
        p.watcher = ListingWatcher(cfg, lambda: p.symbols, trading, session, budget, stop, p.change_symbols,
                                   clock=clock)
    if supervisor is not None:
        p.supervise(supervisor)
    return p


def _rotate(batches: list[StreamBatch], conn: int) -> None:
    """serverShutdown on connection `conn`: its supervisor replaces it now."""
    for b in batches:
        if b.reader is not None and b.reader.conn_id == conn:
            b.rotate_now.set()
            return
