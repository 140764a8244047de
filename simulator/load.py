"""Load mode: the simulator as a traffic generator for benchmarks (thousands of symbols).

The normal engine moves real books and renders every frame with orjson, then sends it
through aiohttp one frame at a time: about 20 µs of simulator CPU per frame, too much to
drive the collector at tens of thousands of messages per second from the same 2-core
box. In load mode:

- each stream's payloads come from a small pool of pre-rendered level lists, so a frame
  is one bytes formatting: ids and times are filled in, everything else is fixed text;
- update ids stay exactly as Binance chains them (spot `U = previous u + 1`; futures one
  global counter, chained by `pu`), so the collector's continuity checks see real work;
- every 10 ms a tenth of the streams emit (each stream every 100 ms), and each
  connection gets its frames as WebSocket frames built here, in one transport write;
- profile `universe` is shaped like the real exchange instead: every partial depth stream
  every 100 ms, the diffs of the market's first 100 symbols (its most traded) every
  100 ms, and the long tail's every 300 ms (about 3 a second);
- profile `finest` is the finest data Binance publishes: spot as SBE (binary diffs every
  20 ms, depth20 every 50 ms; the simulator must run with `--feed sbe`), USD-M diffs every
  event (`@depth@0ms`), each event its own frame and its own write, at rates skewed as on
  the exchange (the first symbol near 1,000 events a second, the tail a few; in bursts:
  a 100 ms window is busy, at 5x its rate, one time in five, and quiet otherwise);
- `E` is the millisecond of that write, and `sent_us[E]` its exact µs time, from which
  the benchmark computes each diff's stamp delay (received_time - sent time);
- `writes`: how frames reach a connection. `burst` (the default) as the exchange pushes its
  100 ms streams: a connection's frames of a tick in one write, ticks 10 ms apart. `each`
  as it pushes every-event streams: every frame its own write, ticks 1 ms apart (a
  stream's frames spread over 100 ticks of its 100 ms, so writes to one connection rarely
  meet), which makes every socket read carry one frame.

The levels do not evolve as a book would (a rebuilt book is meaningless): this is for
measuring the collector, never for testing what it records.
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, cast

import orjson

from serve import sbe
from serve.exchange import ws_frame

if TYPE_CHECKING:
    from simulator.server import MarketSim
    from simulator.server import SimStream as Stream

POOL = 8
TICKS_PER_PERIOD = 10  # 10 ms ticks, every stream once per 100 ms
TAIL_TICKS = 30  # profile `universe`: the long tail's diffs every 300 ms
TOP_SYMBOLS = 100  # profile `universe`: the symbols whose diffs come every 100 ms
WRITES = ("burst", "each")
MAX_LAG = 0.1  # s behind the tick schedule past which missed ticks are skipped, not sent in a burst


def _levels(rng: random.Random, mid: int, n: int, side: int) -> bytes:
    return orjson.dumps([[f"{(mid + side * (k + 1)) / 100:.2f}", f"{rng.randrange(1, 50_000) / 1000:.3f}"]
                         for k in range(n)])


class LoadEngine:
    def __init__(self, sim: "MarketSim", profile: str = "flat", writes: str = "burst"):
        if writes not in WRITES:
            raise ValueError(f"writes {writes!r}: one of {', '.join(WRITES)}")
        self.sim = sim
        self.profile = profile
        self.each = writes == "each"
        self.scale = 10 if self.each else 1  # ticks of 1 ms instead of 10
        self.tick_s = 0.01 / self.scale
        self.cycle = (TAIL_TICKS if profile == "universe" else TICKS_PER_PERIOD) * self.scale
        self.rank = {s: i for i, s in enumerate(sim.symbols)}
        self.rng = random.Random(11)
        self.futures = sim.futures
        self.global_id = 600_000_000_000
        self.ids = {s: self.rng.randrange(10_000_000, 900_000_000) for s in sim.symbols}
        self.templates: dict[str, list[bytes]] = {}
        self.sent_us: dict[int, int] = {}
        # E -> connection -> (µs before, µs after) its write, and which connections carry a
        # symbol: the benchmark's bounds on when each frame arrived
        self.writes: dict[int, dict[int, tuple[int, int]]] = {}
        self.symbol_conns: dict[str, set[int]] = {}
        self.held_writes = 0  # writes TCP could not take at once (a reader behind: the bounds do not hold)
        self.frames = 0
        self.skipped_ticks = 0
        self._slices: list[list[Stream]] = []
        self._every_event: list[Stream] = []  # `finest` futures diffs: frames by events, not ticks
        self._busy: dict[str, float] = {}  # symbol -> rate factor of its current 100 ms window
        self.sbe_levels: dict[str, list] = {}  # `finest` spot: each stream's pool of SBE level mantissas
        self._sliced = -1  # len(sim.streams) when _slices was made

    def _pool(self, s: "Stream") -> list[bytes]:
        """Pre-rendered payload texts of one stream, with %d slots for ids and times."""
        pool = self.templates.get(s.name)
        if pool is not None:
            return pool
        mid = self.rng.randrange(10_000, 5_000_000)
        pool = []
        for _ in range(POOL):
            if s.kind == "diff":
                nb, na = self.rng.randint(0, 4), self.rng.randint(0, 4)
            else:
                nb = na = s.levels
            b, a = _levels(self.rng, mid, nb, -1), _levels(self.rng, mid, na, 1)
            b, a = b.replace(b"%", b"%%"), a.replace(b"%", b"%%")
            if self.futures:
                head = b'{"e":"depthUpdate","E":%d,"T":%d,"s":"' + s.symbol.encode() + b'","U":%d,"u":%d,"pu":%d,'
            elif s.kind == "diff":
                head = b'{"e":"depthUpdate","E":%d,"s":"' + s.symbol.encode() + b'","U":%d,"u":%d,'
            else:
                head = b'{"lastUpdateId":%d,'
            keys = (b'"b":', b'"a":') if (self.futures or s.kind == "diff") else (b'"bids":', b'"asks":')
            pool.append(head + keys[0] + b + b"," + keys[1] + a + b"}")
        self.templates[s.name] = pool
        return pool

    def _payload(self, s: "Stream", now_ms: int, k: int) -> bytes:
        template = self._pool(s)[k % POOL]
        if self.futures:
            if s.kind == "diff":
                self.global_id += self.rng.randint(1, 40)
                U = s.prev_u + 1 if s.prev_u else self.global_id
                u = self.global_id
                out = template % (now_ms, now_ms - 3, U, u, s.prev_u)
                s.prev_u = u
                self.ids[s.symbol] = u
            else:
                u = self.ids[s.symbol]
                out = template % (now_ms, now_ms - 3, u, u, u)
            return out
        if s.kind == "diff":
            U = self.ids[s.symbol] + 1
            u = U + self.rng.randint(0, 3)
            self.ids[s.symbol] = u
            return template % (now_ms, U, u)
        return template % (self.ids[s.symbol],)

    async def run(self) -> None:
        tick, k = 0, 0
        next_tick = time.monotonic()
        while True:
            next_tick += self.tick_s
            now = time.monotonic()
            if now - next_tick > MAX_LAG:
                # Behind (e.g. the first emit of thousands of streams renders their pools):
                # skip the missed ticks rather than send them all at once, a burst the
                # exchange would not send. The bench's recorded/s then falls short of its
                # offered/s, so skipping can never flatter a result.
                self.skipped_ticks += int((now - next_tick) / self.tick_s)
                next_tick = now
            await asyncio.sleep(max(0.0, next_tick - now))
            if self.sim.faults.paused:
                continue
            tick = (tick + 1) % self.cycle
            k += 1
            self.emit(tick, k)

    def period(self, s: "Stream") -> int:
        """Ticks between two frames of the stream (0: every event, `finest` futures diffs)."""
        if self.profile == "universe" and s.kind == "diff" and self.rank.get(s.symbol, 0) >= TOP_SYMBOLS:
            return TAIL_TICKS * self.scale
        if self.profile == "finest":
            if self.sim.sbe:
                return (2 if s.kind == "diff" else 5) * self.scale  # 20 ms and 50 ms
            if s.kind == "diff":
                return 0
        return TICKS_PER_PERIOD * self.scale

    def event_rate(self, symbol: str) -> float:
        """`finest` futures: events a second of the symbol ranked i (the first near 1,000)."""
        return 1000.0 / (1 + self.rank.get(symbol, 0)) ** 1.5

    def offered_per_s(self) -> float:
        """Frames a second over every stream the collector reads (diff + partial per symbol)."""
        ticks_per_s = 100
        if self.profile == "finest":
            if self.sim.sbe:
                return len(self.sim.symbols) * (ticks_per_s / 2 + ticks_per_s / 5)
            return sum(map(self.event_rate, self.sim.symbols)) + len(self.sim.symbols) * ticks_per_s / TICKS_PER_PERIOD
        diffs = [ticks_per_s / (TAIL_TICKS if self.profile == "universe" and i >= TOP_SYMBOLS else TICKS_PER_PERIOD)
                 for i in range(len(self.sim.symbols))]
        return ticks_per_s / TICKS_PER_PERIOD * len(self.sim.symbols) + sum(diffs)

    def _slice(self, tick: int) -> list["Stream"]:
        """The streams that emit at `tick`, recomputed when streams are added: looking at
        every stream every 10 ms was most of the simulator's CPU."""
        streams = self.sim.streams
        if len(streams) != self._sliced:
            self._slices = [[] for _ in range(self.cycle)]
            self._every_event = []
            for s in cast("list[Stream]", list(streams.values())):
                period = self.period(s)
                if period == 0:
                    self._every_event.append(s)
                    continue
                for at in range(hash(s.name) % period, self.cycle, period):
                    self._slices[at].append(s)
            self._sliced = len(streams)
        return self._slices[tick]

    def _sbe_payload(self, s: "Stream", now_ms: int, k: int) -> bytes:
        """`finest` spot: one SBE message (a diff's ids chained as spot's are)."""
        pool = self.sbe_levels.get(s.name)
        if pool is None:
            mid, n = self.rng.randrange(10**9, 5 * 10**11), 20 if s.kind == "partial" else 0
            pool = self.sbe_levels[s.name] = [
                ([(mid - 10**6 * (i + 1), self.rng.randrange(1, 10**9)) for i in range(n or self.rng.randint(0, 4))],
                 [(mid + 10**6 * (i + 1), self.rng.randrange(1, 10**9)) for i in range(n or self.rng.randint(0, 4))])
                for _ in range(POOL)]
        bids, asks = pool[k % POOL]
        if s.kind == "diff":
            U = self.ids[s.symbol] + 1
            u = U + self.rng.randint(0, 3)
            self.ids[s.symbol] = u
            return sbe.diff(now_ms * 1000, U, u, -8, -8, bids, asks, s.symbol)
        return sbe.depth(now_ms * 1000, self.ids[s.symbol], -8, -8, bids, asks, s.symbol)

    def _every_event_frames(self, tick: int, now_ms: int, k: int) -> dict:
        """`finest` futures: this tick's events of each symbol, each its own frame and write:
        conn -> [frame, ...] (a write each)."""
        if tick % (TICKS_PER_PERIOD * self.scale) == 0:  # a new 100 ms window: busy (5x) one time in five, else quiet
            self._busy = {s.symbol: 5.0 if self.rng.random() < 0.2 else 0.0 for s in self._every_event}
        writes: dict = {}
        for s in self._every_event:
            if not s.subscribers:
                continue
            expected = self.event_rate(s.symbol) * self._busy.get(s.symbol, 1.0) * self.tick_s
            for _ in range(int(expected) + (self.rng.random() < expected % 1)):
                payload = self._payload(s, now_ms, k)
                wrapped = ws_frame(b'{"stream":"' + s.name.encode() + b'","data":' + payload + b"}")
                for conn in s.subscribers:
                    writes.setdefault(conn, []).append(wrapped if conn.combined else ws_frame(payload))
        return writes

    def emit(self, tick: int, k: int) -> None:
        """This tick's slice of the streams: one write per connection (`each`: one write per
        frame; and, `finest` futures, one write per event)."""
        now_ms = int(time.time() * 1000)
        out: dict = {}
        first = now_ms not in self.sent_us
        for s in self._slice(tick):
            if not s.subscribers:
                continue
            if self.sim.sbe:  # binary, no stream wrapper
                frame = ws_frame(self._sbe_payload(s, now_ms, k), binary=True)
                for conn in s.subscribers:
                    out.setdefault(conn, []).append(frame)
                    if first:
                        self.symbol_conns.setdefault(s.symbol, set()).add(id(conn))
                continue
            payload = self._payload(s, now_ms, k)
            frames = {False: (payload, b"")}
            for conn in s.subscribers:
                micro = conn.micro and s.kind == "diff"  # spot `timeUnit=MICROSECOND`: `E` in µs
                if micro not in frames:
                    frames[micro] = (payload.replace(b'"E":%d,' % now_ms, b'"E":%d,' % (now_ms * 1000), 1), b"")
                data, wrapped = frames[micro]
                if not wrapped:
                    wrapped = ws_frame(b'{"stream":"' + s.name.encode() + b'","data":' + data + b"}")
                    frames[micro] = (data, wrapped)
                out.setdefault(conn, []).append(wrapped if conn.combined else ws_frame(data))
                if first:
                    self.symbol_conns.setdefault(s.symbol, set()).add(id(conn))
        each = self._every_event_frames(tick, now_ms, k) if self._every_event else {}
        sent_us = time.time_ns() // 1000  # just before the writes: the earliest a frame can arrive
        writes = {}
        for conn in set(out) | set(each):
            if conn.transport is not None and not conn.transport.is_closing():
                start = time.time_ns() // 1000
                frames = out.get(conn, [])
                if self.each:
                    for frame in frames:
                        conn.transport.write(frame)
                elif frames:
                    conn.transport.write(b"".join(frames))
                for frame in each.get(conn, ()):  # every event its own write, as the exchange sends them
                    conn.transport.write(frame)
                # on loopback the bytes are in the reader's socket when the write returns,
                # unless TCP held some back for a reader whose window was full
                writes[id(conn)] = (start, time.time_ns() // 1000)
                self.held_writes += conn.transport.get_write_buffer_size() > 0
                self.frames += len(frames) + len(each.get(conn, ()))
                if first:
                    for s in self._every_event:
                        if conn in s.subscribers:
                            self.symbol_conns.setdefault(s.symbol, set()).add(id(conn))
        if first:
            self.sent_us[now_ms] = sent_us
            self.writes[now_ms] = writes

    def snapshot(self, symbol: str, limit: int) -> bytes:
        """A REST depth body at the symbol's current id (fixed levels)."""
        u = self.ids[symbol] if not self.futures else self.global_id
        now_ms = int(time.time() * 1000)
        n = min(limit, 1000)
        body = b'{"lastUpdateId":%d,' % u
        if self.futures:
            body += b'"E":%d,"T":%d,' % (now_ms, now_ms - 2)
        return body + b'"bids":' + _levels(self.rng, 1_000_000, n, -1) + b',"asks":' + _levels(self.rng, 1_000_000, n, 1) + b"}"
