"""The processor thread of one market: raw frames and snapshot responses in, Arrow
tables out.

    ws-<market>-N  --(WS, received_us, conn, [bytes])----\
                                                          >-- inbox --> processor --> writer
    rest-<market>  --(REST, received_us, (sym, ...))-----/        |
                                                                  +--> journal (crash safety)

It appends every item to the write-ahead journal, decodes with msgspec (orjson for
what msgspec refuses), routes by stream name, checks continuity, drops duplicates,
records gaps (and asks for a snapshot of the symbol at once). Its buffers hold levels
as the frames' JSON text for at most `DepthColumns.RAW_LIMIT` bytes, then as Arrow chunks;
every `BUILD_ROWS` rows or `build_interval` seconds, whichever comes first, it hands
them to the writer as tables (at 400 msgs/s a build every second was a sixth of the
processor's time; BENCHMARKS.md); every `flush_interval` it closes the journal segment
and tells the writer to publish the part files of that segment.
"""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from config import MarketConfig
from handlers.ingest.inbox import CLOCK, LOST, REST, SYMBOLS, WS, Inbox
from handlers.process import continuity as cont
from handlers.process import parse, sbe, wire
from handlers.process.coverage import RunningCoverage
from handlers.process.delivery import DeliveryCounts
from markets import STREAM_NAME
from service.threads import FATAL, PipelineThread
from storage.columns import DepthColumns, GapColumns, SnapshotColumns, levels_to_arrow, raw_levels
from storage.journal import Journal
from storage.schemas import SCHEMAS
from storage.writer import SEGMENT, STOP

# (lastUpdateId, (bid prices, sizes), (ask prices, sizes), event time, transaction time)
SnapshotRow = tuple[int, Any, Any, int | None, int | None]

log = logging.getLogger(__name__)

DIFF, PARTIAL = "diff_orderbooks", "partial_orderbooks"
_BATCH = 2048
MAX_FRAME_BYTES = 4 << 20
MAX_ROWS_HELD = 200_000  # a segment ends early past this many rows (bounds memory at high rates)
BUILD_ROWS = 8192  # rows handed to the writer once this many are buffered, or every build_interval
BUILD_SNAPSHOTS = 32  # or this many snapshots


@dataclass
class ProcessStats:
    frames: dict[str, int] = field(default_factory=lambda: {DIFF: 0, PARTIAL: 0})
    snapshots: int = 0
    duplicates: int = 0
    stale: int = 0
    gaps: int = 0
    malformed: int = 0
    control: int = 0
    server_shutdowns: int = 0
    reordered: int = 0
    gaps_by_reason: dict[str, int] = field(default_factory=dict)
    heartbeat: float = 0.0  # monotonic time of the loop's last turn (watchdog)
    last_frame_us: int = 0
    # received_time - event_time of the last build's diffs, p50 and p99, in s (None before
    # any): the way from the exchange's matching engine to this host's kernel, plus any
    # difference between the two clocks
    receive_delay: tuple[float, float] | None = None


class RateLimitedLog:
    """At most one log line per `every` seconds per key; counts what it held back."""

    def __init__(self, logger: logging.Logger, every: float = 10.0):
        self.logger, self.every = logger, every
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def __call__(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.every:
            self.held[key] = self.held.get(key, 0) + 1
            return
        held = self.held.pop(key, 0)
        self.last[key] = now
        self.logger.log(level, msg + (" (%d similar suppressed)" if held else ""), *args, *((held,) if held else ()))


def routes_for(cfg: MarketConfig) -> dict[str, tuple[str, str]]:
    """stream name -> (kind, SYMBOL)"""
    routes = {}
    for sym in cfg.symbols:
        diff, partial = cfg.streams_of(sym)
        routes[diff], routes[partial] = (DIFF, sym), (PARTIAL, sym)
    return routes


def route_by_name(stream: str) -> tuple[str, str] | None:
    """Route any depth stream by its name alone (journal recovery: the symbol list may
    have changed since the frame was journaled, and a journaled frame is never dropped)."""
    m = STREAM_NAME.match(stream)
    if m is None:
        return None
    return (PARTIAL if m.group(2) else DIFF), m.group(1).upper()


def in_arrival_order(batch: list) -> list:
    """A batch's items, each connection's reads in the order it made them, merged across
    connections by their stamps (REST answers likewise, among themselves); STOP stays last.

    With redundant connections the copy of a frame processed first is the one kept, and
    its stamp is the row's received_time. A reader can stamp a read and then wait for the
    GIL while another reader stamps the same frames later and queues them first (the
    interpreter hands the GIL over every 5 ms): without this the later stamp was kept,
    and the stamp delay's p99 went from 0.3 to 8 ms at redundancy 2 (bench/run.py)."""
    sources: dict = {}
    for item in batch:
        if item is not STOP:
            sources.setdefault(item[2] if item[0] == WS else None, []).append(item)
    if len(sources) < 2:
        return batch
    merged = list(heapq.merge(*sources.values(), key=lambda item: item[1]))
    return merged + [STOP] if len(merged) < len(batch) else merged


class FrameProcessor(PipelineThread):
    # FATAL: its continuity state and the open journal segment cannot be rebuilt in place;
    # the journal makes a restarted collector whole (systemd restarts it)
    on_crash = FATAL

    def __init__(self, cfg: MarketConfig, inbox: Inbox | None, outbox: queue.Queue | queue.SimpleQueue,
                 flush_interval: float, now_us: Callable[[], int],
                 request_snapshot: Callable[[str], None] = lambda symbol: None,
                 on_server_shutdown: Callable[[int], None] = lambda conn: None,
                 journal: Journal | None = None, build_interval: float = 5.0, recovering: bool = False):
        super().__init__(name=f"processor-{cfg.name}", daemon=True)
        self.cfg, self.inbox, self.outbox = cfg, inbox, outbox
        self.flush_interval, self.now_us, self.request_snapshot = flush_interval, now_us, request_snapshot
        self.on_server_shutdown = on_server_shutdown
        self.journal, self.recovering = journal, recovering
        self.record_start = True
        self.rows_in_segment = 0
        self.build_interval = min(build_interval, flush_interval)
        # s, the journal's push interval; waits only when the queue is empty (frames are stamped
        # by the readers)
        self.poll = 0.2
        self._idle = threading.Event()  # never set: an interruptible sleep (STOP arrives on the queue)
        self.routes = routes_for(cfg)
        self.sbe = cfg.feed == "sbe"
        futures = cfg.market.futures_payloads
        self._diff_parse = parse.futures_depth if futures else parse.spot_diff
        self._futures = futures
        self.continuity = cont.Continuity(cfg.market, cont.memory_for(cfg.diff_speed))
        self.partial_dedup = cont.PartialDedup()
        self.holes = cont.PendingHoles(cfg.market)
        self.bufs = {DIFF: DepthColumns(DIFF), PARTIAL: DepthColumns(PARTIAL)}
        self.snapshots = SnapshotColumns()
        self.gaps = GapColumns()
        self.clock_rows: list[dict] = []  # `clock` samples (handlers/clock.py), one a minute
        self.delivery = DeliveryCounts()  # for the quality record
        self.coverage = RunningCoverage()  # today's, for status and metrics
        self.stats = ProcessStats()
        self.warn = RateLimitedLog(log)

    def loop(self) -> None:
        now = time.monotonic()
        next_build, next_flush = now + self.build_interval, now + self.flush_interval
        sync_every = self.journal.sync_every if self.journal else 1.0
        while True:
            now = self.stats.heartbeat = time.monotonic()
            batch = self._take_batch(max(0.0, min(next_build, next_flush, now + sync_every) - now))
            stopping = self.handle(in_arrival_order(batch))
            self.confirm_holes(all_now=stopping)
            if self.journal is not None:
                self.journal.sync()
            now = time.monotonic()
            buffered = sum(len(b) for b in self.bufs.values())
            if stopping or now >= next_flush or self.rows_in_segment + buffered > MAX_ROWS_HELD:
                self.end_segment()
                next_build, next_flush = now + self.build_interval, now + self.flush_interval
                self._slow("end_segment", now)
            elif now >= next_build or buffered >= BUILD_ROWS or len(self.snapshots) >= BUILD_SNAPSHOTS:
                self.build()
                next_build = now + self.build_interval
                self._slow("build", now)
            if stopping:
                if self.journal is not None:
                    self.journal.close()
                self.outbox.put(STOP)
                return

    def _slow(self, step: str, since: float) -> None:
        """Frames wait in the queue while the processor is busy elsewhere: say so."""
        took = time.monotonic() - since
        if took > 0.5:
            self.warn(logging.WARNING, "slow", "processor step %s took %.1fs market=%s queue=%d",
                      step, took, self.cfg.name, self.inbox.qsize() if self.inbox else 0)

    def _take_batch(self, timeout: float) -> list:
        """What the queue holds (up to about _BATCH frames). When it is empty, wait `poll`
        seconds once and look again, rather than block in get(): a blocked get() is woken
        by every single read, and those wake-ups (GIL hand-overs) cost more than decoding
        its frames. Frames are stamped by the readers, so this adds nothing to received_time.
        What arrived during the wait is taken in the same call: returning an empty batch
        instead cost a second turn of the loop for every wait (BENCHMARKS.md, "Per read,
        third round")."""
        assert self.inbox is not None  # the thread runs on an inbox; recovery calls handle() itself
        batch = self._take_queued()
        if not batch:
            self._idle.wait(min(timeout, self.poll))
            batch = self._take_queued()
        return batch

    def _take_queued(self) -> list:
        assert self.inbox is not None
        get = self.inbox.get_nowait
        batch: list = []
        frames = 0
        try:
            while frames < _BATCH:
                item = get()
                batch.append(item)
                frames += len(item[3]) if item is not STOP and item[0] == WS else 1
        except queue.Empty:
            pass
        return batch

    def handle(self, batch: list) -> bool:
        """Process inbox items in order (the thread's loop, and journal recovery); True at STOP."""
        on_frames, journal, saw = self.on_frames, self.journal, self.continuity.saw
        for item in batch:
            if item is STOP:
                return True
            if item[0] == WS:
                saw(item[2], item[1])
                kept = on_frames(item[1], item[2], item[3])
                if journal is not None and kept:
                    journal.add_ws(item[1], item[2], kept)  # less the duplicates
            elif item[0] == REST:
                if journal is not None:
                    journal.add_rest(item[1], *item[2])
                self.on_snapshot(item[1], *item[2])
            elif item[0] == SYMBOLS:
                self.on_symbols(item[1], *item[2])
            elif item[0] == CLOCK:
                self.clock_rows.append(item[2])
            elif item[0] == LOST:
                _, streams = item[2]
                self.delivery.lost(item[1], {r[1] for r in map(self.routes.get, streams) if r is not None})
        return False

    def on_symbols(self, received_us: int, added: tuple[str, ...], removed: tuple[tuple[str, str], ...]) -> None:
        """The market's symbol set changed while running. An added symbol's streams are
        routed from now on (its record starts with its first diff, a `start` row and a
        snapshot, as at start-up). A removed one's record ends with a `gaps` row naming
        why (next_first_update_id null), after its streams were unsubscribed; its routes
        stay, so that a late frame is still recorded (then as a new start)."""
        self.routes.update(routes_for(replace(self.cfg, symbols=tuple(added))))
        for symbol, reason in removed:
            for hole in self.holes.drop(symbol):  # breaks before the end are gaps still
                self._gap(symbol, hole.detected_us, hole.last_u, hole.end_U, hole.reason)
            st = self.continuity.streams.pop(symbol, None)
            self.partial_dedup.seen.pop(symbol, None)
            last_u = st.head if st is not None else None
            self.gaps.append(received_us, symbol, last_u, None, reason)
            self.coverage.ended(symbol, received_us)
            self.stats.gaps_by_reason[reason] = self.stats.gaps_by_reason.get(reason, 0) + 1
            log.info("record ends market=%s symbol=%s reason=%s last_u=%s", self.cfg.name, symbol, reason, last_u)

    def on_frames(self, received_us: int, conn: int, frames: list[bytes]) -> list[bytes]:
        """The frames of one socket read; returns them for the journal, less the
        well-formed duplicates (a redundant connection's copies: they add nothing to
        replay). The fast path: a well-formed depth frame of a configured stream, typed by
        msgspec, continuing its stream; anything else goes to `_on_other_frame` (general
        parsing) or `Continuity.check` (gaps, duplicates).

        A copy is only known as one after its decode: reading its stream name and final id
        off the head first (byte searches and an int() in Python) cost as much as
        msgspec's whole decode, which leaves the level lists unparsed, and it ran on every
        frame (`bench/stages.py`: 14.0 -> 17.2 µs a recorded spot message at redundancy 2).

        This loop runs for every frame and holds the GIL throughout, so what would be
        calls is written out here (the profile put ~2 µs a frame in them, more than the
        decoding): the field checks of `wire.depth_row`, the continuing case of
        `Continuity.check` and the first-copy case of `PartialDedup.is_duplicate`, and
        the buffer appends, made once a read. tests/test_fastpath.py checks this loop
        against those functions on random streams."""
        decode, DecodeError = wire.decode_frame, wire.DecodeError
        routes, futures, stats = self.routes, self._futures, self.stats
        chains_by_pu = self.cfg.market.chains_by_pu
        streams, check = self.continuity.streams, self.continuity.check
        dedup = self.partial_dedup
        seen_by_symbol, dedup_memory = dedup.seen, dedup.memory
        OK, DUPLICATE = cont.OK, cont.DUPLICATE
        d_rows, d_bids, d_asks, p_rows, p_bids, p_asks = [], [], [], [], [], []
        d_bytes = p_bytes = diffs = partials = 0
        kept = None  # the frames to journal, once a duplicate is left out
        for i, raw in enumerate(frames):
            if kept is not None:
                kept.append(raw)
            if len(raw) > MAX_FRAME_BYTES:
                self._malformed("oversized frame", raw)
                continue
            try:
                msg = decode(raw)
                kind, symbol = routes[msg.stream]
            except (DecodeError, KeyError):
                kind = None
            if kind is DIFF:
                d = msg.data
                U, u, b, a = d.U, d.u, d.b, d.a
                if futures:
                    pu, T = d.pu, d.T
                    ok = pu is not None and T is not None
                else:
                    pu = T = None
                    ok = True
                if ok and d.e == "depthUpdate" and d.s == symbol and d.E is not None and U is not None \
                        and u is not None and b and a:
                    diffs += 1
                    st = streams.get(symbol)
                    # Market.continues, written out
                    if st is not None and u > (last_u := st.head) and ((pu == last_u) if chains_by_pu else (U <= last_u + 1)):
                        ring, n = st.ring, st.n  # Continuity.check's "ok", written out
                        ring[n % len(ring)] = u
                        st.n, st.head, st.conn, st.head_us = n + 1, u, conn, received_us
                    else:
                        status, last_u = check(symbol, U, u, pu, conn, received_us)  # type: ignore[assignment]
                        if status != OK:
                            if status == DUPLICATE:
                                stats.duplicates += 1
                                self.delivery.duplicated(received_us, symbol, u)
                                if kept is None:
                                    kept = frames[:i]
                                else:
                                    kept.pop()
                                continue
                            self._irregular(status, received_us, symbol, last_u, U, u, pu)
                    d_rows.append((received_us, d.E, symbol, U, u, pu, T))
                    d_bids.append(b)
                    d_asks.append(a)
                    d_bytes += len(b) + len(a)
                    continue
            elif kind is PARTIAL:
                d = msg.data
                if futures:
                    E, U, u, pu, T, b, a = d.E, d.U, d.u, d.pu, d.T, d.b, d.a
                    ok = (d.e == "depthUpdate" and d.s == symbol and E is not None and U is not None
                          and u is not None and pu is not None and T is not None)
                else:
                    E = U = pu = T = None
                    u, b, a = d.lastUpdateId, d.bids, d.asks
                    ok = u is not None
                if ok and b and a:
                    partials += 1
                    entry = seen_by_symbol.get(symbol)  # PartialDedup.is_duplicate, written out
                    if entry is None:
                        entry = seen_by_symbol[symbol] = ({}, deque())
                    ids, order = entry
                    first = ids.get(u)  # type: ignore[arg-type]  # ok above: u is not None
                    if first is None:
                        ids[u] = conn  # type: ignore[index]
                        order.append(u)
                        if len(order) > dedup_memory:
                            del ids[order.popleft()]
                    elif first != conn:
                        stats.duplicates += 1
                        if kept is None:
                            kept = frames[:i]
                        else:
                            kept.pop()
                        continue
                    p_rows.append((received_us, E, symbol, U, u, pu, T))
                    p_bids.append(b)
                    p_asks.append(a)
                    p_bytes += len(b) + len(a)
                    continue
            # not a well-formed depth frame of a configured stream: rows so far go first
            if d_rows:
                self.bufs[DIFF].extend_raw(d_rows, d_bids, d_asks, d_bytes)
                d_rows, d_bids, d_asks, d_bytes = [], [], [], 0
            if p_rows:
                self.bufs[PARTIAL].extend_raw(p_rows, p_bids, p_asks, p_bytes)
                p_rows, p_bids, p_asks, p_bytes = [], [], [], 0
            self._on_other_frame(received_us, conn, raw)
        if diffs or partials:
            stats.last_frame_us = received_us
            stats.frames[DIFF] += diffs
            stats.frames[PARTIAL] += partials
        if d_rows:
            self.bufs[DIFF].extend_raw(d_rows, d_bids, d_asks, d_bytes)
        if p_rows:
            self.bufs[PARTIAL].extend_raw(p_rows, p_bids, p_asks, p_bytes)
        return frames if kept is None else kept

    def _on_other_frame(self, received_us: int, conn: int, raw: bytes) -> None:
        """Control replies, serverShutdown, streams known only by name (recovery) and
        malformed frames: decoded with orjson and judged field by field; and, with
        `feed = sbe`, the binary market data frames."""
        if self.sbe and raw[:1] != b"{":
            self._on_sbe_frame(received_us, conn, raw)
            return
        try:
            msg = orjson.loads(raw)
            stream = msg["stream"]
            route = self.routes.get(stream)
            data = msg["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._not_data(raw, conn)
            return
        if route is None:
            route = route_by_name(stream) if self.recovering and isinstance(stream, str) else None
            if route is None:
                self._not_data(raw, conn)
                return
        kind, symbol = route
        self.stats.last_frame_us = received_us
        self.stats.frames[kind] += 1
        if kind == DIFF:
            row = self._diff_parse(data)
        else:
            row = parse.futures_depth(data) if self._futures else parse.spot_partial(data, symbol)
        if row is None or row[1] != symbol:
            self._malformed(kind, raw)
            return
        if self._accept(kind, received_us, symbol, row, conn):
            self.bufs[kind].append(received_us, *row)

    def _on_sbe_frame(self, received_us: int, conn: int, raw: bytes) -> None:
        """One SBE message (`handlers.process.sbe`): routed by its symbol and template, then
        judged as a JSON frame is (continuity, duplicates); one that does not decode is
        malformed, never a row."""
        try:
            template, row, exponents = sbe.decode_packed(raw)
        except sbe.SbeError as e:
            self._malformed(f"SBE frame ({e})", raw)
            return
        kind = DIFF if template == sbe.DIFF else PARTIAL
        symbol = row[1]
        stream = self.cfg.streams_of(symbol)[1 if kind == PARTIAL else 0]
        if self.routes.get(stream) != (kind, symbol) and not self.recovering:
            self._malformed("SBE frame of a symbol not recorded", raw)
            return
        self.stats.last_frame_us = received_us
        self.stats.frames[kind] += 1
        if self._accept(kind, received_us, symbol, row, conn):
            if exponents is None:
                self.bufs[kind].append(received_us, *row)
            else:
                event, symbol, first, final, prev, ttime, bids, asks = row
                self.bufs[kind].append_packed(received_us, event, symbol, first, final, prev, ttime, bids, asks,
                                              *exponents)

    def _accept(self, kind: str, received_us: int, symbol: str, row: tuple, conn: int) -> bool:
        """Continuity and duplicates; False for a duplicate (the same diff is written once)."""
        _, _, U, u, pu, _, _, _ = row
        if kind == DIFF:
            status, last_u = self.continuity.check(symbol, U, u, pu, conn, received_us)
            if status == cont.OK:
                return True
            if status == cont.DUPLICATE:
                self.stats.duplicates += 1
                self.delivery.duplicated(received_us, symbol, u)
                return False
            self._irregular(status, received_us, symbol, last_u, U, u, pu)
            return True
        if self.partial_dedup.is_duplicate(symbol, u, conn):
            self.stats.duplicates += 1
            return False
        return True

    def _irregular(self, status: str, received_us: int, symbol: str, last_u: int | None, U: int, u: int,
                   pu: int | None) -> None:
        if status == cont.STALE:
            if self.holes.fill(symbol, U, u, pu):
                self.stats.reordered += 1
                log.info("events reordered across connections market=%s symbol=%s; no gap", self.cfg.name, symbol)
                return
            self.stats.stale += 1
            self.warn(logging.WARNING, "stale", "diff older than the stream head market=%s symbol=%s u=%d head=%d; recorded",
                      self.cfg.name, symbol, u, last_u)
            return
        if status == cont.START and not self.record_start:
            return  # replaying a later journal segment: the stream began in rows already on disk
        if status in (cont.SEQUENCE, cont.RECONNECT):
            assert last_u is not None  # a break follows an event already seen
            # another connection (a redundant copy, or the other one of a rotation) may
            # still deliver the missing events: hold the break
            older = self.holes.open(symbol, received_us, last_u, U, pu, time.monotonic(), status)
            if older is not None:
                self._gap(symbol, older.detected_us, older.last_u, older.end_U, older.reason)
            return
        self._gap(symbol, received_us, last_u, U, status)

    def confirm_holes(self, all_now: bool = False) -> None:
        """Holes whose missing events did not turn up in time become gap rows."""
        for symbol, hole in self.holes.due(None if all_now else time.monotonic()):
            self._gap(symbol, hole.detected_us, hole.last_u, hole.end_U, hole.reason)

    def _gap(self, symbol: str, detected_us: int, last_u: int | None, U: int, status: str) -> None:
        self.gaps.append(detected_us, symbol, last_u, U, status)
        self.stats.gaps += 1
        self.stats.gaps_by_reason[status] = self.stats.gaps_by_reason.get(status, 0) + 1
        if status != cont.START:
            log.warning("gap market=%s symbol=%s reason=%s last_u=%s next_U=%d",
                        self.cfg.name, symbol, status, last_u, U)
        self.request_snapshot(symbol)
        if status == cont.START:
            self.coverage.started(symbol, detected_us)
        else:  # the snapshot that resyncs it must reach the first missing id
            self.coverage.broke(symbol, detected_us, U if self._futures else U - 1)

    def on_snapshot(self, received_us: int, symbol: str, limit: int, request_us: int, raw: bytes) -> None:
        """Checked and converted at once, so that a malformed snapshot is fetched again:
        msgspec and the bulk level check first, orjson and the row-by-row one for what
        they refuse (as for frames)."""
        row = self._snapshot_fast(raw)
        if row is None:
            row = self._snapshot_general(raw)
        if row is None:
            self._malformed("orderbooks", raw)
            if not self.recovering:
                self.request_snapshot(symbol)  # a failed snapshot is retried, never lost
            return
        last, b, a, E, T = row
        self.snapshots.append(request_us, received_us, last, b, a, limit, symbol, E, T)
        self.stats.snapshots += 1
        self.coverage.snapshot(symbol, received_us, last)

    def _snapshot_fast(self, raw: bytes) -> SnapshotRow | None:
        try:
            snap = wire.decode_snapshot(raw)
            E, T = (snap.E, snap.T) if self._futures else (None, None)  # spot: not part of the row
            if not snap.bids or not snap.asks or (self._futures and (E is None or T is None)):
                return None
            return snap.lastUpdateId, raw_levels([snap.bids]), raw_levels([snap.asks]), E, T
        except (wire.DecodeError, ValueError, pa.ArrowException):
            return None

    def _snapshot_general(self, raw: bytes) -> SnapshotRow | None:
        try:
            row = parse.snapshot(orjson.loads(raw), self._futures)
            if row is None:
                return None
            last, b, a, E, T = row
            return last, levels_to_arrow([b]), levels_to_arrow([a]), E, T
        except (orjson.JSONDecodeError, ValueError, TypeError, pa.ArrowException):
            return None

    def _not_data(self, raw: bytes, conn: int) -> None:
        """Control replies ({"result":null,"id":1}) are expected; anything else is malformed."""
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            msg = None
        if isinstance(msg, dict) and "id" in msg and ("result" in msg or "error" in msg):
            self.stats.control += 1
            if "error" in msg:
                log.error("exchange refused a request market=%s reply=%s", self.cfg.name, raw[:200])
            return
        if isinstance(msg, dict) and (msg.get("stream") == "!serverShutdown" or msg.get("e") == "serverShutdown"):
            # {"stream":"!serverShutdown","data":{"e":"serverShutdown","E":..}}: replace the
            # connection now, make-before-break (no lead time is guaranteed).
            self.stats.control += 1
            self.stats.server_shutdowns += 1
            log.warning("serverShutdown received market=%s conn=%d; replacing the connection", self.cfg.name, conn)
            if not self.recovering:
                self.on_server_shutdown(conn)
            return
        self._malformed("frame", raw)

    def _malformed(self, kind: str, raw: bytes) -> None:
        self.stats.malformed += 1
        self.warn(logging.WARNING, "malformed", "malformed %s skipped market=%s bytes=%d head=%r",
                  kind, self.cfg.name, len(raw), bytes(raw[:120]))

    def _note_delay(self, table: pa.Table) -> None:
        """The receive delay of a build's diffs (a few thousand rows, once every few seconds)."""
        delay = pc.subtract(table.column("received_time"), table.column("event_time")).drop_null()
        if len(delay):
            p50, p99 = pc.quantile(delay, q=[0.5, 0.99]).to_pylist()
            self.stats.receive_delay = (p50 / 1e6, p99 / 1e6)

    def end_segment(self) -> None:
        """Build, close the journal segment, and tell the writer to publish its parts."""
        self.build()
        self.rows_in_segment = 0
        if self.journal is not None:
            self.outbox.put((SEGMENT, self.journal.close_segment()))
        else:
            self.outbox.put((SEGMENT, None))

    def build(self) -> None:
        """Hand every buffered row to the writer, one table per kind."""
        now = self.now_us()
        self.rows_in_segment += sum(len(b) for b in self.bufs.values())
        for kind, buf in self.bufs.items():
            if len(buf):
                table, dropped = buf.take()
                for values in dropped:
                    self._malformed(kind, repr(values).encode())
                    if kind == DIFF:
                        # The row is lost to rule 3; users must see the hole it leaves:
                        # the diff after last_final_update_id, starting at U, is missing.
                        _, _, symbol, U, _, pu, _ = values
                        self.gaps.append(now, symbol, pu if self._futures else U - 1, U, "malformed")
                        self.request_snapshot(symbol)
                if kind == DIFF:
                    self._note_delay(table)
                self.outbox.put((kind, table))
        if len(self.snapshots):
            self.outbox.put(("orderbooks", self.snapshots.take()))
        if len(self.gaps):
            self.outbox.put(("gaps", self.gaps.take()))
        if self.clock_rows:
            rows, self.clock_rows = self.clock_rows, []
            self.outbox.put(("clock", pa.Table.from_pylist(rows, schema=SCHEMAS["clock"])))
        if len(self.delivery):
            self.outbox.put(("quality", self.delivery.take()))
