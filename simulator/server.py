"""The simulated exchange: the Binance protocol server (`serve/exchange.py`) driven by
books that move (`simulator/book.py`), by captured traffic (`simulator/replay.py`) or by
benchmark load (`simulator/load.py`), for tests, benchmarks and demos.

`Faults` (from the server) holds the switches tests flip to make it misbehave, for every
connection at once; `cut_connection`, `stall_connection` and `server_shutdown(conn_id)`
hit one connection alone. `record=True` keeps every frame and REST body it delivered, and
`conn_log` when each connection opened, stalled and closed, so tests can compare them
with the collector's files. `list_symbol`, `halt_symbol` and `delist_symbol` change what
exchangeInfo lists while running.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Awaitable, cast

import orjson

from serve import sbe as sbe_frames
from serve.exchange import Conn, ExchangeServer, Faults, Sent, Stream, runner_port
from simulator.book import Book, IdSource
from simulator.load import LoadEngine
from simulator.replay import Capture

__all__ = ["Conn", "Faults", "MarketSim", "Sent", "Simulator", "SimStream", "load_capture", "runner_port"]

TICK_S = 0.01


class SimStream(Stream):
    """A stream with the engine's state: the book it follows and the changes since its last frame."""

    def __init__(self, name: str, symbol: str, kind: str, speed_ms: int, levels: int, book: Book | None):
        super().__init__(name, symbol, kind, speed_ms, levels)
        self.book = book
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.first_id: int | None = None
        self.prev_u = book.last_id if book else 0
        self.next_emit_ms = 0


class MarketSim(ExchangeServer):
    def __init__(self, market: str, symbols: list[str] | None = None, updates_per_s: float = 20.0,
                 seed: int = 1, record: bool = False, ping_interval: float | None = None,
                 pong_timeout: float | None = None, not_trading: tuple[str, ...] = (),
                 capture: Capture | None = None, replay_speed: float = 1.0, weight_limit: int | None = None,
                 load: bool = False, ssl_context=None, load_profile: str = "flat", clock_skew_ms: float = 0.0,
                 feed: str = "json", load_writes: str = "burst"):
        if capture is not None:
            symbols = capture.symbols
        super().__init__(market, symbols or ["BTCUSDT", "ETHUSDT"], seed, record, ping_interval, pong_timeout,
                         not_trading, weight_limit, ssl_context)
        self.sbe = feed == "sbe" and not self.futures  # spot SBE: binary frames, the API key required
        self.clock_skew_ms = clock_skew_ms  # the exchange's clock this far ahead of ours (the time endpoint)
        self.capture = capture
        self.ids = IdSource(self.futures, self.rng)
        self.books = {} if capture or load else {s: Book.create(s, self.ids, self.rng, self.futures)
                                                 for s in self.symbols}
        self.load = LoadEngine(self, load_profile, load_writes) if load else None  # benchmark traffic (simulator/load.py)
        self.updates_per_s = updates_per_s
        self.replay_speed = replay_speed
        self.emitted: list[tuple[str, int, int, float]] = []  # every diff event: (symbol, U, u, t)
        self.dropped: list[tuple[str, int, int]] = []          # diff events dropped by a fault
        self.halted_books: dict[str, Book | None] = {}

    # ---- what it serves -------------------------------------------------------------------
    def engine(self) -> Awaitable[None]:
        return self._replay() if self.capture else self.load.run() if self.load else self._engine()

    def new_stream(self, name: str, symbol: str, kind: str, speed_ms: int, levels: int) -> Stream:
        return SimStream(name, symbol, kind, speed_ms, levels, self.books.get(symbol))

    def server_time_ms(self) -> int:
        return int(time.time() * 1000 + self.clock_skew_ms)

    def depth_body(self, symbol: str, limit: int) -> bytes | None:
        if self.capture is not None:
            return self.capture.snapshots[symbol]
        if self.load is not None:
            return self.load.snapshot(symbol, limit)
        book = self.books.get(symbol) or self.halted_books[symbol]
        assert book is not None
        snap: dict[str, object] = {"lastUpdateId": book.last_id}
        if self.futures:
            now_ms = int(time.time() * 1000)
            snap.update(E=now_ms, T=now_ms - 2)
        if self.coin_m:
            snap.update(symbol=symbol, pair=symbol.split("_")[0])
        snap.update(bids=book.levels("bids", limit), asks=book.levels("asks", limit))
        return orjson.dumps(snap)

    # ---- the matching engine ------------------------------------------------------------
    async def _engine(self) -> None:
        carry = {s: 0.0 for s in self.books}
        next_tick = time.monotonic()
        while True:
            next_tick += TICK_S
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            if self.faults.paused:
                continue
            diff_streams: dict[str, list[Stream]] = {}
            for s in self.streams.values():
                if s.kind == "diff":
                    diff_streams.setdefault(s.symbol, []).append(s)
            for sym, book in self.books.items():
                carry[sym] = carry.get(sym, 0.0) + self.updates_per_s * TICK_S
                n = int(carry[sym])
                carry[sym] -= n
                streams = cast("list[SimStream]", diff_streams.get(sym, []))
                for _ in range(n):
                    uid, bids, asks = book.update()
                    for s in streams:
                        if s.first_id is None:
                            s.first_id = uid
                        s.bids.update(bids)
                        s.asks.update(asks)
                        if s.speed_ms == 0:  # `@depth@0ms`: every update its own frame, as it happens
                            await self._emit(s, int(time.time() * 1000))
            now_ms = int(time.time() * 1000)
            for s in cast("list[SimStream]", list(self.streams.values())):
                if s.speed_ms and now_ms >= s.next_emit_ms:
                    s.next_emit_ms = (now_ms // s.speed_ms + 1) * s.speed_ms
                    await self._emit(s, now_ms)

    async def _emit(self, s: SimStream, now_ms: int) -> None:
        book = s.book
        assert book is not None  # the engine's streams have a book (replay and load mode have their own senders)
        payload: dict[str, object]
        data_us: bytes | None = None
        sbe = b""  # the same event as an SBE message (feed="sbe")
        if s.kind == "diff":
            if s.first_id is None:
                return  # "pushed ... (if existing)": nothing changed in the window
            payload = {"e": "depthUpdate", "E": now_ms}
            if self.futures:
                payload["T"] = now_ms - 3
            first_id = s.first_id
            payload.update(s=s.symbol, U=first_id, u=book.last_id)
            if self.futures:
                payload["pu"] = s.prev_u
            if self.coin_m:
                payload["ps"] = s.symbol.split("_")[0]
            payload.update(b=book.render(s.bids, True), a=book.render(s.asks, False))
            if self.sbe:
                sbe = sbe_frames.diff(int(time.time() * 1e6), first_id, book.last_id, -book.price_decimals,
                                      -book.qty_decimals, sorted(s.bids.items(), reverse=True), sorted(s.asks.items()),
                                      s.symbol)
            elif not self.futures:  # spot: the same event for connections that asked for µs times
                data_us = orjson.dumps({**payload, "E": int(time.time() * 1_000_000)})
            if self.record:
                self.emitted.append((s.symbol, first_id, book.last_id, time.time()))
            s.bids, s.asks, s.first_id, s.prev_u = {}, {}, None, book.last_id
            f = self.faults
            if f.drop_diffs > 0 and f.drop_symbol in (None, s.symbol) and s.subscribers:
                f.drop_diffs -= 1
                self.dropped.append((s.symbol, first_id, book.last_id))
                return
        elif self.futures:
            payload = {"e": "depthUpdate", "E": now_ms, "T": now_ms - 3, "s": s.symbol,
                       "U": s.prev_u + 1, "u": book.last_id, "pu": s.prev_u,
                       "b": book.levels("bids", s.levels), "a": book.levels("asks", s.levels)}
            s.prev_u = book.last_id
        else:
            payload = {"lastUpdateId": book.last_id, "bids": book.levels("bids", s.levels),
                       "asks": book.levels("asks", s.levels)}
            if self.sbe:
                top = sorted(book.bids, reverse=True)[:s.levels], sorted(book.asks)[:s.levels]
                sbe = sbe_frames.depth(int(time.time() * 1e6), book.last_id, -book.price_decimals, -book.qty_decimals,
                                       [(p, book.bids[p]) for p in top[0]], [(p, book.asks[p]) for p in top[1]],
                                       s.symbol)
        if self.sbe:
            await self.broadcast(s, sbe)
            return
        await self.broadcast(s, orjson.dumps(payload), data_us)


    async def _replay(self) -> None:
        """Send the captured frames of subscribed streams, paced as captured."""
        cap = self.capture
        assert cap is not None
        while not any(self.streams.get(name) and self.streams[name].subscribers for name in cap.depth_streams):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let the collector's first snapshots go out
        t0, start = cap.frames[0][0], time.monotonic()
        for t, name, data in cap.frames:
            await asyncio.sleep(max(0.0, (t - t0) / self.replay_speed - (time.monotonic() - start)))
            while self.faults.paused:
                await asyncio.sleep(0.05)
            s = self.streams.get(name)
            if s is not None:
                await self.broadcast(s, data)


    # ---- listings while running (tests) --------------------------------------------------
    async def list_symbol(self, symbol: str) -> None:
        """A new symbol starts trading: in exchangeInfo, and its book moves from now on."""
        if symbol not in self.symbols:
            self.symbols.append(symbol)
        self.status.pop(symbol, None)
        if self.capture is None and self.load is None and symbol not in self.books:
            self.books[symbol] = Book.create(symbol, self.ids, self.rng, self.futures)

    async def halt_symbol(self, symbol: str, status: str = "HALT") -> None:
        """A symbol stops trading: its status changes and its book stops moving."""
        self.status[symbol] = status
        self.halted_books[symbol] = self.books.pop(symbol, None)

    async def delist_symbol(self, symbol: str) -> None:
        """A symbol is gone from exchangeInfo (and its book stops)."""
        if symbol in self.symbols:
            self.symbols.remove(symbol)
        self.halted_books[symbol] = self.books.pop(symbol, None)


class Simulator:
    """Spot and futures simulators on an event loop in a background thread (for tests).

    with Simulator(spot=dict(symbols=[...]), futures=dict(...)) as sim:
        sim.spot.ws_url, sim.futures.rest_url, sim.spot.faults.paused = True, ...
    """

    def __init__(self, spot: dict | None = None, futures: dict | None = None, delivery: dict | None = None):
        self.loop = asyncio.new_event_loop()
        self.spot = MarketSim("spot", **spot) if spot is not None else None
        self.futures = MarketSim("futures", **futures) if futures is not None else None
        self.delivery = MarketSim("delivery", **delivery) if delivery is not None else None
        self.thread = threading.Thread(target=self.loop.run_forever, name="simulator", daemon=True)

    def call(self, coro, timeout: float = 10):
        """Run a coroutine on the simulator's loop (e.g. sim.call(sim.spot.cut_connections()))."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> "Simulator":
        self.thread.start()
        for m in self.markets():
            self.call(m.start())
        return self

    def __exit__(self, *exc) -> None:
        for m in self.markets():
            self.call(m.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def markets(self) -> list[MarketSim]:
        return [m for m in (self.spot, self.futures, self.delivery) if m is not None]


def load_capture(data_dir: Path, market: str) -> Capture:
    prefix = {"spot": "BINANCE", "futures": "BINANCE_FUTURES", "delivery": "BINANCE_DELIVERY"}[market]
    return Capture.load(data_dir / f"{prefix}.ws.1.0", data_dir / f"{prefix}.http.0.0")

