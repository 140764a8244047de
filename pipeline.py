"""A market's pipeline: every thread and queue that records it, built from the config,
and the order in which they stop.

    readers (ws-<market>-<batch><copy>) ─┐
    snapshot-<market> (REST pool) ───────┴─► inbox ─► processor-<market> ─► writer-<market> ─► part files
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import requests

import config as config_mod
from handlers.exchange import check_symbols, fetch_exchange_info, weight_limit
from handlers.frames import FrameProcessor
from handlers.inbox import Inbox
from handlers.snapshots import Snapshotter, WeightBudget
from handlers.stamped import wall_us
from handlers.websocket import AttemptLimiter, BatchCopies, StreamBatch, combined_url
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

    def start(self) -> None:
        self.writer.start()
        self.processor.start()
        for b in self.batches:
            b.start()
        self.snapshotter.start()

    def counters(self) -> Counters:
        """Every counter of this market's threads, at this moment."""
        p, w, ss, batches = self.processor.stats, self.writer.stats, self.snapshotter.stats, self.batches
        groups = [(g.name, g.live(), g.n) for g in self.groups]
        per = self.cfg.symbols_per_connection
        return Counters(
            market=self.cfg.name, symbols=len(self.cfg.symbols), streams=2 * len(self.cfg.symbols),
            streams_live=sum(2 * len(self.cfg.symbols[i * per:(i + 1) * per])
                             for i, (_, live, _) in enumerate(groups) if live),
            connections_live=sum(live for _, live, _ in groups), connections=sum(n for _, _, n in groups),
            degraded=tuple(f"{name}:{live}/{n}" for name, live, n in groups if live < n),
            batches=tuple(groups), last_data_us=tuple((b.name, b.stats.last_frame_us) for b in batches),
            connects=sum(b.stats.connects for b in batches), rotations=sum(b.stats.rotations for b in batches),
            dead=sum(b.stats.dead for b in batches), last_attempt=max((b.stats.last_attempt for b in batches), default=0.0),
            frames=dict(p.frames), gaps=p.gaps, gaps_by_reason=dict(p.gaps_by_reason), duplicates=p.duplicates,
            malformed=p.malformed, queue=self.inbox.qsize(), rows_written=dict(w.rows), files=w.files,
            bytes_written=w.bytes, write_errors=w.errors, rows_lost=w.lost_rows, snapshot_rows=p.snapshots,
            snapshots_ok=ss.ok, snapshots_failed=ss.failed, snapshots_rate_limited=ss.rate_limited,
            snapshot_latency_sum=ss.latency_sum, last_snapshot_us=ss.last_ok_us,
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


def resolve_symbols(cfg: config_mod.Config, session: requests.Session,
                    stop: threading.Event) -> tuple[list[config_mod.MarketConfig], dict[str, int]]:
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
