"""A Binance-compatible exchange server: one aiohttp server per market (WebSocket + REST on
one port). `collector.py replay` serves recorded days with it; the loopback simulator
(`simulator/`) drives it with its own books for tests, benchmarks and demos.

WebSocket (paths as on Binance; futures also under /public):
  /stream?streams=a/b   combined, frames wrapped as {"stream":..,"data":..}; `/stream/<name>`
                        the same, opening with no stream (ccxt tells a spot connection from a
                        futures one by `/stream` in its URL, and connects to `<url>/<n>`)
  /ws, /ws/a/b          raw; SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY,
                        GET_PROPERTY; control messages limited to 5/s (spot) or 10/s (futures);
                        `/ws/<name>` without an `@` (ccxt's `/ws/0`) opens with no stream
  server pings every `ping_interval` s; a connection without a pong for `pong_timeout` s is closed
REST:
  /api/v3/depth, /api/v3/exchangeInfo, /api/v3/ticker/24hr, /api/v3/time, /api/v3/ping     (spot)
  /fapi/v1/depth, /fapi/v1/exchangeInfo, /fapi/v1/ticker/24hr, /fapi/v1/time, /fapi/v1/ping (futures)
  /dapi/v1/depth, /dapi/v1/exchangeInfo, /dapi/v1/ticker/24hr, /dapi/v1/time, /dapi/v1/ping (COIN-M)
  request weights as documented, `X-MBX-USED-WEIGHT-1M`, 429 + Retry-After past the limit

What it serves comes from a subclass: `depth_body()` answers REST depth, `server_time_ms()`
the time endpoint, `engine()` (a coroutine, optional) sends frames through `broadcast()`.
`Faults` are switches that make the server misbehave towards its clients (every one off
unless a caller flips it): the simulator's tests use them to prove the collector survives
a bad exchange. `record=True` keeps every frame and REST body sent, and `conn_log` when
each connection opened, stalled and closed.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Awaitable

import orjson
from aiohttp import WSMsgType, web

from markets import DELIVERY, MARKETS, STREAM_NAME, Market

log = logging.getLogger(__name__)

_conn_ids = itertools.count(1)


def ws_frame(payload: bytes, binary: bool = False) -> bytes:
    """An unmasked server-to-client text (or binary) frame (RFC 6455 section 5.2)."""
    n, head = len(payload), 0x82 if binary else 0x81
    if n < 126:
        return bytes((head, n)) + payload
    if n < 65536:
        return bytes((head, 126)) + n.to_bytes(2, "big") + payload
    return bytes((head, 127)) + n.to_bytes(8, "big") + payload


@dataclass
class Faults:
    """Misbehaviour switches; read by the engine and the handlers on every use.
    Connection cuts and serverShutdown are actions: MarketSim.cut_connections(),
    MarketSim.server_shutdown()."""

    paused: bool = False            # no engine updates and no frames at all
    drop_diffs: int = 0             # the next N diff events are not sent to anyone (a gap)
    drop_symbol: str | None = None  # ... only of this symbol
    duplicate_frames: int = 0       # the next N frames are sent twice
    stall: bool = False             # stop sending while TCP stays open (the book moves on)
    stall_new: bool = False         # connections opened from now on start stalled (stall_connection() resumes one)
    answer_pings: bool = True       # False: client pings get no pong
    count_pongs: bool = True        # False: client pongs are ignored (the server drops it after pong_timeout)
    max_age: float | None = None    # close connections older than this many seconds
    garbage_frames: int = 0         # the next N frames are preceded by a garbage frame
    rest_statuses: list = field(default_factory=list)  # next REST depth replies: (status, retry_after|None)
    rest_delay: float = 0.0         # seconds added to every REST depth reply
    withhold_diffs: float = 0.0     # each diff frame is withheld from each connection with this chance
                                    # (independently: another connection may still get it)


@dataclass
class Sent:
    conn: int
    stream: str
    data: bytes  # the payload, without the combined-stream wrapper
    t: float = 0.0  # wall clock when it was handed to the socket


GARBAGE = [
    b"this is not json",
    b'{"stream":"%s","data":{"e":"depthUpdate","E":1}}',        # a real stream, fields missing
    b'{"stream":"nosuch@trade","data":{"e":"trade"}}',          # a stream nobody asked for
    b'{"stream":"%s","data":[1,2,3]}',
    b"\xff\xfe\x00 binary junk",
    b'{"stream":"%s","data":{"e":"depthUpdate","pad":"' + b"x" * (5 << 20) + b'"}}',  # oversized (5 MiB)
]


class Stream:
    """One stream of one symbol (e.g. btcusdt@depth@100ms); lives once subscribed."""

    def __init__(self, name: str, symbol: str, kind: str, speed_ms: int, levels: int):
        self.name, self.symbol, self.kind, self.speed_ms, self.levels = name, symbol, kind, speed_ms, levels
        self.subscribers: set["Conn"] = set()


class Conn:
    def __init__(self, ws: web.WebSocketResponse, combined: bool, transport: asyncio.Transport | None = None,
                 micro: bool = False):
        self.id = next(_conn_ids)
        self.ws, self.combined, self.transport = ws, combined, transport
        self.micro = micro  # spot `timeUnit=MICROSECOND`: its frames' times in µs
        self.opened = time.monotonic()
        self.stalled = False  # this connection alone gets no frames (its pings go on)
        self.streams: set[str] = set()
        self.control_times: list[float] = []
        self.last_pong = time.monotonic()



class ExchangeServer:
    """One market's exchange on one port. Subclasses say what it serves (the module's
    docstring); the protocol, limits and faults are here."""

    def __init__(self, market: str, symbols: list[str] | None = None, seed: int = 1, record: bool = False,
                 ping_interval: float | None = None, pong_timeout: float | None = None,
                 not_trading: tuple[str, ...] = (), weight_limit: int | None = None,
                 ssl_context: ssl.SSLContext | None = None):
        self.market: Market = MARKETS[market]
        self.ssl_context = ssl_context  # an ssl.SSLContext (server side): wss:// and https://
        self.futures = self.market.futures_payloads  # USD-M and COIN-M
        self.coin_m = self.market is DELIVERY
        self.rng = random.Random(seed)
        self.symbols = [s.upper() for s in symbols or []]
        self.not_trading = set(not_trading)
        self.status: dict[str, str] = {}  # symbol -> status other than TRADING (halt_symbol)
        self.volumes: dict[str, float] = {}  # symbol -> 24h quote volume, where a test sets it
        self.record = record
        self.sent: list[Sent] = []
        self.garbage_sent = 0
        self.rest_sent: list[tuple[str, int, bytes]] = []
        self.rest_log: list[tuple[float, str, int]] = []        # every depth request: (t, symbol, status)
        self.conn_log: list[tuple[float, int, str]] = []        # (wall time, conn id, open|stall|unstall|close)
        self.faults = Faults()
        self.ping_interval = ping_interval or (20.0 if not self.futures else 180.0)
        self.pong_timeout = pong_timeout or (60.0 if not self.futures else 600.0)
        self.weight_limit = weight_limit or (6000 if not self.futures else 2400)
        self.weight_minute, self.weight_used = -1, 0
        self.weight_by_minute: dict[int, int] = {}  # UTC minute -> request weight used in it
        self.streams: dict[str, Stream] = {}
        self.withheld: list[tuple[int, str, bytes]] = []  # (conn, stream, payload) not sent (Faults.withhold_diffs)
        self.conns: set[Conn] = set()
        self.connections_opened = 0
        self.frames_sent = 0
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self.host, self.port = "127.0.0.1", 0
        self.sbe = False  # spot SBE streams: binary frames, an API key required at the handshake
        self.api_keys_seen: set[str] = set()  # X-MBX-APIKEY values of accepted handshakes (tests)
        self.api_keys: set[str] | None = None  # the keys it accepts (None: any)

    # ---- what a subclass serves ----------------------------------------------------------
    def engine(self) -> Awaitable[None] | None:
        """The coroutine that sends frames (started with the server), or None."""
        return None

    def new_stream(self, name: str, symbol: str, kind: str, speed_ms: int, levels: int) -> Stream:
        return Stream(name, symbol, kind, speed_ms, levels)

    def depth_body(self, symbol: str, limit: int) -> bytes | None:
        """REST depth's answer for a listed symbol; None: nothing to answer with (404)."""
        raise NotImplementedError

    def server_time_ms(self) -> int:
        return int(time.time() * 1000)

    # ---- life cycle -------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        prefixes = ["", self.market.ws_path_prefix] if self.market.ws_path_prefix else [""]
        for p in prefixes:
            app.router.add_get(p + "/stream", self.ws_handler)
            app.router.add_get(p + "/stream/{name}", self.ws_handler)
            app.router.add_get(p + "/ws", self.ws_handler)
            app.router.add_get(p + "/ws/{streams:.*}", self.ws_handler)
        m = self.market
        app.router.add_get(m.depth_path, self.depth)
        app.router.add_get(m.exchange_info_path, self.exchange_info)
        app.router.add_get(m.ticker_path, self.ticker)
        app.router.add_get(m.time_path, self.server_time)
        app.router.add_get(m.time_path.removesuffix("/time") + "/ping", self.ping)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.ssl_context)
        await site.start()
        self.port = runner_port(site)
        self.host = host
        engine = self.engine()
        if engine is not None:
            self._tasks.append(asyncio.ensure_future(engine))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for c in list(self.conns):
            await c.ws.close()
        if self._runner:
            await self._runner.cleanup()

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.ssl_context else "ws"
        return f"{scheme}://{self.host}:{self.port}" + self.market.ws_path_prefix

    @property
    def rest_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    async def broadcast(self, s: Stream, data: bytes, data_us: bytes | None = None) -> None:
        """`data` to every subscriber of `s`; `data_us`, when given, to those that asked for
        µs times (spot `timeUnit=MICROSECOND`) instead. With SBE, `data` is one binary
        message, sent as it is on raw and combined streams alike."""
        f = self.faults
        if not s.subscribers or f.stall:
            return
        kind = WSMsgType.BINARY if self.sbe else WSMsgType.TEXT
        ms_data = data
        ms_wrapped = b'{"stream":"' + s.name.encode() + b'","data":' + data + b"}"
        us_wrapped = b'{"stream":"' + s.name.encode() + b'","data":' + data_us + b"}" if data_us else ms_wrapped
        copies = 1
        if f.duplicate_frames > 0:
            f.duplicate_frames -= 1
            copies = 2
        for conn in list(s.subscribers):
            if conn.ws.closed or conn.stalled:
                continue
            data, wrapped = (data_us, us_wrapped) if conn.micro and data_us else (ms_data, ms_wrapped)
            if f.withhold_diffs and s.kind == "diff" and self.rng.random() < f.withhold_diffs:
                self.withheld.append((conn.id, s.name, data))
                continue
            try:
                if f.garbage_frames > 0:
                    f.garbage_frames -= 1
                    junk = GARBAGE[self.garbage_sent % len(GARBAGE)]
                    self.garbage_sent += 1
                    await conn.ws.send_frame(junk.replace(b"%s", s.name.encode()), WSMsgType.TEXT)
                for _ in range(copies):
                    await conn.ws.send_frame(wrapped if conn.combined and not self.sbe else data, kind)
            except (ConnectionError, RuntimeError):
                continue
            self.frames_sent += copies
            if self.record:
                t = time.time()
                for _ in range(copies):
                    self.sent.append(Sent(conn.id, s.name, data, t))

    # ---- actions (call through Simulator.do from other threads) ---------------------------
    async def cut_connections(self, abrupt: bool = False) -> int:
        """End every connection: a clean close frame, or a TCP reset with no close at all."""
        conns = list(self.conns)
        for conn in conns:
            await self._end(conn, abrupt)
        return len(conns)

    @staticmethod
    async def _end(conn: "Conn", abrupt: bool) -> None:
        if abrupt and conn.transport is not None:
            sock = conn.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.transport.abort()
        else:
            await conn.ws.close(code=1001, message=b"going away")

    def live_conns(self) -> list[int]:
        """Ids of the open connections, oldest first."""
        return sorted(c.id for c in self.conns if not c.ws.closed)

    def _conn(self, conn_id: int) -> "Conn | None":
        return next((c for c in self.conns if c.id == conn_id), None)

    async def cut_connection(self, conn_id: int, abrupt: bool = False) -> bool:
        """End one connection: a clean close frame, or a TCP reset."""
        conn = self._conn(conn_id)
        if conn is None:
            return False
        await self._end(conn, abrupt)
        return True

    async def stall_connection(self, conn_id: int, stalled: bool = True) -> bool:
        """Stop (or resume) sending frames on one connection; its pings go on, TCP stays open."""
        conn = self._conn(conn_id)
        if conn is None:
            return False
        conn.stalled = stalled
        self.conn_log.append((time.time(), conn_id, "stall" if stalled else "unstall"))
        return True

    async def server_shutdown(self, conn_id: int | None = None) -> int:
        """Spot's serverShutdown event, on every connection or on one (combined or raw form)."""
        event = orjson.dumps({"e": "serverShutdown", "E": int(time.time() * 1000)})
        for conn in [c for c in self.conns if conn_id is None or c.id == conn_id]:
            frame = b'{"stream":"!serverShutdown","data":' + event + b"}" if conn.combined else event
            try:
                await conn.ws.send_frame(frame, WSMsgType.TEXT)
            except (ConnectionError, RuntimeError):
                pass
        return len(self.conns)

    # ---- WebSocket ---------------------------------------------------------------------
    def parse_stream(self, name: str) -> Stream | None:
        m = STREAM_NAME.match(name)
        if not m:
            return None
        sym, levels, speed = m.group(1).upper(), m.group(2), m.group(3)
        if sym not in self.symbols:
            return None
        speeds = self.market.partial_speeds if levels else self.market.diff_speeds
        default_ms = 250 if self.futures else 1000
        if self.sbe:  # spot SBE: `<symbol>@depth` every 20 ms, `<symbol>@depth20` every 50 ms, nothing else
            if speed is not None or levels not in (None, "20"):
                return None
            speed_ms = 50 if levels else 20
        elif speed is None:
            speed_ms = default_ms
        elif speed in speeds:  # spelled out too where it is the default (spot `@1000ms`, futures `@250ms`)
            speed_ms = int(speed[:-2])
        else:
            return None
        s = self.streams.get(name)
        if s is None:
            s = self.new_stream(name, sym, "partial" if levels else "diff", speed_ms, int(levels or 0))
            self.streams[name] = s
        return s

    async def ws_handler(self, request: web.Request) -> web.StreamResponse:
        path = request.path.removeprefix("/public")
        if path.startswith("/stream"):
            names, combined = [n for n in request.query.get("streams", "").split("/") if n], True
        else:
            # `/ws/<anything>`: a client may open a raw connection under a name of its own
            # (ccxt: `/ws/0`) and SUBSCRIBE later; only stream-shaped names (`x@y`) are streams
            names = [n for n in request.match_info.get("streams", "").split("/") if "@" in n]
            combined = False
        if len(names) > self.market.max_streams_per_connection:
            return web.json_response({"code": -1, "msg": "too many streams"}, status=400)
        parsed = [self.parse_stream(n) for n in names]
        streams = [s for s in parsed if s is not None]
        if len(streams) < len(parsed):
            return web.json_response({"code": -1121, "msg": "Invalid stream name."}, status=400)
        if self.sbe:
            key = request.headers.get("X-MBX-APIKEY", "")
            if not key or (self.api_keys is not None and key not in self.api_keys):
                return web.json_response({"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."},
                                         status=401)
            self.api_keys_seen.add(key)
        ws = web.WebSocketResponse(autoping=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        micro = not self.futures and request.query.get("timeUnit", "").upper() == "MICROSECOND"
        conn = Conn(ws, combined, request.transport, micro)
        conn.stalled = self.faults.stall_new
        self.conns.add(conn)
        self.connections_opened += 1
        self.conn_log.append((time.time(), conn.id, "open"))
        for s in streams:
            s.subscribers.add(conn)
            conn.streams.add(s.name)
        pinger = asyncio.create_task(self._ping(conn))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.PING:
                    if self.faults.answer_pings:
                        await ws.pong(msg.data)
                elif msg.type == WSMsgType.PONG:
                    if self.faults.count_pongs:
                        conn.last_pong = time.monotonic()
                elif msg.type == WSMsgType.TEXT:
                    if not await self._control(conn, msg.data):
                        break
        finally:
            pinger.cancel()
            self._drop(conn)
            await ws.close()
        return ws

    def _drop(self, conn: Conn) -> None:
        self.conn_log.append((time.time(), conn.id, "close"))
        self.conns.discard(conn)
        for name in conn.streams:
            self.streams[name].subscribers.discard(conn)

    async def _ping(self, conn: Conn) -> None:
        """Server pings every ping_interval; also ends connections past the max_age fault."""
        next_ping = time.monotonic() + self.ping_interval
        while not conn.ws.closed:
            await asyncio.sleep(min(0.2, self.ping_interval))
            now = time.monotonic()
            if self.faults.max_age is not None and now - conn.opened > self.faults.max_age:
                await conn.ws.close(code=1000, message=b"max age")
                return
            if now < next_ping:
                continue
            next_ping = now + self.ping_interval
            if now - conn.last_pong > self.pong_timeout:
                log.info("closing conn=%d: no pong for %.0fs", conn.id, self.pong_timeout)
                await conn.ws.close(code=1008, message=b"pong timeout")
                return
            try:
                await conn.ws.ping(str(int(time.time() * 1000)).encode())
            except (ConnectionError, RuntimeError):
                return

    async def _control(self, conn: Conn, text: str) -> bool:
        """One JSON control message; False closes the connection."""
        now = time.monotonic()
        conn.control_times = [t for t in conn.control_times if now - t < 1.0] + [now]
        if len(conn.control_times) > self.market.max_control_per_second:
            await conn.ws.close(code=1008, message=b"too many requests")
            return False
        try:
            req = orjson.loads(text)
        except orjson.JSONDecodeError:
            await self._reply(conn, None, error=(3, "Invalid JSON"))
            return not self.futures  # futures closes the connection on invalid JSON
        if not isinstance(req, dict):
            await self._reply(conn, None, error=(3, "Invalid JSON"))
            return True
        rid, method, params = req.get("id"), req.get("method"), req.get("params", [])
        if method in ("SUBSCRIBE", "UNSUBSCRIBE") and isinstance(params, list):
            # a stream already subscribed can always be left, even once its symbol is delisted
            parsed = [(self.streams.get(p) if method == "UNSUBSCRIBE" and p in conn.streams else self.parse_stream(p))
                      if isinstance(p, str) else None for p in params]
            streams = [s for s in parsed if s is not None]
            if len(streams) < len(parsed):
                return await self._reply(conn, rid, error=(2, "Invalid request: unknown stream"))
            if method == "SUBSCRIBE" and len(conn.streams | {s.name for s in streams}) > self.market.max_streams_per_connection:
                return await self._reply(conn, rid, error=(2, "Invalid request: too many streams"))
            for s in streams:
                if method == "SUBSCRIBE":
                    s.subscribers.add(conn)
                    conn.streams.add(s.name)
                else:
                    s.subscribers.discard(conn)
                    conn.streams.discard(s.name)
            return await self._reply(conn, rid, result=None)
        if method == "LIST_SUBSCRIPTIONS":
            return await self._reply(conn, rid, result=sorted(conn.streams))
        if method == "SET_PROPERTY" and isinstance(params, list) and len(params) == 2 and params[0] == "combined":
            if not isinstance(params[1], bool):
                return await self._reply(conn, rid, error=(1, "Invalid value type: expected Boolean"))
            conn.combined = params[1]
            return await self._reply(conn, rid, result=None)
        if method == "GET_PROPERTY" and params == ["combined"]:
            return await self._reply(conn, rid, result=conn.combined)
        if method in ("SET_PROPERTY", "GET_PROPERTY"):
            return await self._reply(conn, rid, error=(0, "Unknown property"))
        return await self._reply(conn, rid, error=(2, "Invalid request: unknown method"))

    async def _reply(self, conn: Conn, rid: object, result: object = None, error: tuple[int, str] | None = None) -> bool:
        body = {"error": {"code": error[0], "msg": error[1]}, "id": rid} if error else {"result": result, "id": rid}
        await conn.ws.send_str(orjson.dumps(body).decode())
        return True

    # ---- REST ----------------------------------------------------------------------------
    def _charge(self, weight: int) -> tuple[bool, dict]:
        minute = int(time.time() // 60)
        if minute != self.weight_minute:
            self.weight_minute, self.weight_used = minute, 0
        self.weight_used += weight
        self.weight_by_minute[minute] = self.weight_used
        headers = {"X-MBX-USED-WEIGHT-1M": str(self.weight_used)}
        if self.weight_used > self.weight_limit:
            headers["Retry-After"] = str(60 - int(time.time()) % 60)
            return False, headers
        return True, headers

    async def depth(self, request: web.Request) -> web.Response:
        symbol = request.query.get("symbol", "").upper()
        try:
            limit = int(request.query.get("limit", "500" if self.futures else "100"))
        except ValueError:
            return web.json_response({"code": -1100, "msg": "Illegal characters found in parameter 'limit'."}, status=400)
        if self.futures and limit not in self.market.snapshot_limits:
            return web.json_response({"code": -1130, "msg": "Data sent for parameter 'limit' is not valid."}, status=400)
        limit = max(1, min(limit, 5000))
        ok, headers = self._charge(self.market.depth_weight(limit))
        if self.faults.rest_delay:
            await asyncio.sleep(self.faults.rest_delay)
        if self.faults.rest_statuses:
            status, retry_after = self.faults.rest_statuses.pop(0)
            self.rest_log.append((time.time(), symbol, status))
            if retry_after is not None:
                headers["Retry-After"] = str(retry_after)
            return web.json_response({"code": -1003, "msg": "Too many requests."}, status=status, headers=headers)
        self.rest_log.append((time.time(), symbol, 200 if ok else 429))
        if not ok:
            return web.json_response({"code": -1003, "msg": "Too much request weight used."}, status=429, headers=headers)
        if symbol not in self.symbols:
            return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400, headers=headers)
        body = self.depth_body(symbol, limit)
        if body is None:
            return web.json_response({"code": -1121, "msg": f"No snapshot of {symbol} is available."},
                                     status=404, headers=headers)
        if self.record:
            self.rest_sent.append((symbol, limit, body))
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def exchange_info(self, request: web.Request) -> web.Response:
        """All symbols, or those of `?symbol=X` / `?symbols=["X","Y"]` (Binance's error
        shapes for both at once, a malformed list, an unknown symbol)."""
        ok, headers = self._charge(self.market.exchange_info_weight)
        one, many = request.query.get("symbol"), request.query.get("symbols")
        chosen = self.symbols
        if one is not None and many is not None:
            return web.json_response({"code": -1101, "msg": "Parameter 'symbol' and 'symbols' cannot both be sent."},
                                     status=400, headers=headers)
        if many is not None:
            try:
                names = orjson.loads(many)
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError
            except ValueError:
                return web.json_response({"code": -1100, "msg": "Illegal characters found in parameter 'symbols'."},
                                         status=400, headers=headers)
            chosen = [n.upper() for n in names]
        elif one is not None:
            chosen = [one.upper()]
        if any(s not in self.symbols for s in chosen):
            return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400, headers=headers)
        info = {
            "timezone": "UTC", "serverTime": self.server_time_ms(),
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": self.weight_limit},
                {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 300000},
            ],
            "symbols": [self._symbol_info(s) for s in chosen],
        }
        return web.json_response(info, headers=headers)

    def decimals(self, symbol: str) -> tuple[int, int]:
        """Decimals of the symbol's prices and sizes (its tick and step are 10^-those): the
        simulator's books are in cents and thousandths; the replay's come from the recording."""
        return 2, 3

    def _symbol_info(self, s: str) -> dict:
        """A symbol as exchangeInfo lists it, with the fields clients read (contract type,
        margin asset, the price and size filters, precisions)."""
        status = "BREAK" if s in self.not_trading else self.status.get(s, "TRADING")
        price_places, size_places = self.decimals(s)
        tick, step = ("%.*f" % (n, 10.0 ** -n) for n in (price_places, size_places))
        filters = [{"filterType": "PRICE_FILTER", "tickSize": tick, "minPrice": tick, "maxPrice": "10000000"},
                   {"filterType": "LOT_SIZE", "stepSize": step, "minQty": step, "maxQty": "9000000"}]
        precision = {"pricePrecision": price_places, "quantityPrecision": size_places, "baseAssetPrecision": 8,
                     "quotePrecision": 8}
        if self.coin_m:  # BTCUSD_PERP, ETHUSD_261225: quoted in USD, margined in the base asset
            pair, _, expiry = s.partition("_")
            return {"symbol": s, "pair": pair, "contractType": "PERPETUAL" if expiry == "PERP" else "CURRENT_QUARTER",
                    "contractStatus": status, "baseAsset": pair[:-3], "quoteAsset": "USD", "marginAsset": pair[:-3],
                    "filters": filters, **precision}
        quote = next((q for q in ("USDT", "USDC", "FDUSD", "BTC", "ETH", "EUR") if s.endswith(q)), s[-4:])
        info = {"symbol": s, "status": status, "baseAsset": s[:-len(quote)], "quoteAsset": quote, "filters": filters,
                **precision}
        if self.futures:
            info.update(pair=s, contractType="PERPETUAL", marginAsset=quote)
        return info


    async def ticker(self, request: web.Request) -> web.Response:
        symbol = request.query.get("symbol")
        ok, headers = self._charge(2 if symbol else (40 if self.futures else 80))
        rows = []
        for s in ([symbol.upper()] if symbol else self.symbols):
            if s not in self.symbols:
                return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400, headers=headers)
            quote_volume = self.volumes.get(s, 1e6 * (1 + self.symbols.index(s)))
            if self.coin_m:  # COIN-M: volume in contracts, baseVolume in the base asset
                rows.append({"symbol": s, "pair": s.split("_")[0], "volume": "1000", "baseVolume": str(quote_volume / 2),
                             "weightedAvgPrice": "2.0", "count": 1000, "lastPrice": "2.0"})
            else:
                rows.append({"symbol": s, "volume": "1000.0", "quoteVolume": str(quote_volume),
                             "count": 1000, "lastPrice": "1.0"})
        return web.json_response(rows[0] if symbol else rows, headers=headers)

    async def ping(self, request: web.Request) -> web.Response:
        """`GET /api/v3/ping` (`/fapi/v1/ping`, `/dapi/v1/ping`): `{}`, weight 1; clients
        (python-binance) ping before anything else."""
        ok, headers = self._charge(1)
        return web.json_response({}, headers=headers)

    async def server_time(self, request: web.Request) -> web.Response:
        ok, headers = self._charge(1)
        now_ms = self.server_time_ms()
        return web.json_response({"serverTime": now_ms}, headers=headers)


def runner_port(site: web.TCPSite) -> int:
    """The port a started site listens on (port 0 picks a free one)."""
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    return server.sockets[0].getsockname()[1]
