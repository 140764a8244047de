"""WebSocket readers: one supervisor thread per batch of symbols, one reader thread
per open connection.

A reader does the least work possible per frame (the hot path only stamps and hands over): `recv_data()`, stamp
`received_time` in µs, put `(WS, received_us, conn_id, [bytes, ...])` on the market's
queue: every frame one socket read completed, in one item (one hand-over a read rather
than one a frame). The stamp is the kernel's receive time of the read that completed the
frames (`handlers.ingest.stamped`), a read made by the stamp relay's process (`handlers.ingest.relay`)
as the bytes arrived: exact even while the interpreter is busy elsewhere.
websocket-client answers server pings itself inside `recv_data()` with the ping's
payload, as Binance requires.

Liveness is judged by data alone: a connection that delivered no data frame for
`ws_dead_after` seconds is dead and replaced, whatever pings, pongs or control replies
still arrive (an exchange keeps pinging a connection whose streams stalled; the socket
timeout, reset by every ping, would never fire).

Every batch of streams is read by `ws_redundancy` connections at once (`BatchCopies`),
each kept alive by its own supervisor (`ws-spot-0a`, `ws-spot-0b`, ...) with its own
reader, all into the market's one inbox; the processor writes what several deliver once.
A supervisor reconnects with jittered backoff after a failure, and replaces a connection
older than `ws_rotate_after` make-before-break: the new reader must deliver a first frame
before the old one is closed. The copies of a batch never change at the same moment:
one connects at a time, and rotations fall on slots spread over `ws_rotate_after`, each
waiting until the other copies deliver.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import queue
import socket
import threading
import time
from typing import Callable, Iterable

import websocket

from handlers.ingest import stamped
from handlers.ingest.inbox import LOST, WS, Inbox, Item
from handlers.ingest.relay import StampRelay
from handlers.ingest.timestamps import wall_us
from service.backoff import backoff_delay
from service.threads import RESTART, PipelineThread, name_os_thread

log = logging.getLogger(__name__)

_conn_ids = itertools.count(1)
_control_ids = itertools.count(1)
_DATA = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY)
_CLOSE = websocket.ABNF.OPCODE_CLOSE
_STREAM_PREFIX = b'{"stream":"'  # a combined stream's data frame; '{"stream":"!' is an event (serverShutdown)


_SBE_SCHEMA = b"\x01\x00"  # bytes 4-5 of an SBE message of schema 1 (handlers.process.sbe)


def is_data(frame: bytes) -> bool:
    """A depth stream's frame (JSON, or a binary SBE message), not a control reply
    ({"result":null,"id":1}), an event, or junk."""
    return (frame.startswith(_STREAM_PREFIX) and frame[11:12] != b"!") or frame[4:6] == _SBE_SCHEMA


DRAIN_WAIT = 1.0  # s a closing relayed connection may take to read what its relay held (ms, normally)
COPY_LETTERS = "abc"  # copy k of a batch (ws_redundancy <= 3), and relay k that reads every copy k


def copy_name(batch: str, k: int, n: int) -> str:
    """`ws-spot-0a` for copy k of batch `ws-spot-0` (just the batch's name without redundancy)."""
    return batch + (COPY_LETTERS[k] if n > 1 else "")


def relay_name(k: int) -> str:
    return f"stamp-relay-{COPY_LETTERS[k]}"


def combined_url(ws_url: str, streams: list[str], query: str = "") -> str:
    """`query`: the market's additions (`&timeUnit=MICROSECOND` on spot)."""
    return f"{ws_url}/stream?streams={'/'.join(streams)}{query}"


class ReadAhead:
    """websocket-client reads a frame with one socket read for its 2-byte header and
    another for its payload, each a system call (a poll() and a recv() under a timeout)
    and a GIL hand-over: that is most of its cost per frame at Binance's frame sizes.
    This serves its reads from one larger read instead; `raw_recv` is the library's own
    socket read (timeouts and closed sockets are reported as it always does).

    `data_frames` takes the commonest frame, an unfragmented text or binary frame, straight
    from the buffer, reading more while the buffer is drained or ends inside such a frame
    (websocket-client's Python frame parsing measured as the largest part of a reader's
    time); everything else (pings, close, fragments, a masked or a 64-bit-length frame)
    is left to websocket-client, which reads the same buffer through `recv`."""

    # A read returns what the socket holds, up to `size`: one write of the exchange (a few
    # KiB) while the reader keeps up. 64 KiB rather than 16 lets a reader that fell behind
    # catch up in fewer reads (A/B at 60,000 msgs/s: the queue drained in one run of two,
    # against none; BENCHMARKS.md); its stamp is, as always, that of the newest bytes read.
    def __init__(self, raw_recv: Callable[[int], bytes], size: int = 1 << 16):
        self.raw_recv, self.size = raw_recv, size
        self.buf = b""
        self.pos = 0

    def recv(self, n: int) -> bytes:
        buf, pos = self.buf, self.pos
        if pos >= len(buf):
            buf = self.buf = self.raw_recv(self.size)
            pos = 0
            if not buf:
                return buf  # the peer closed: the library turns b"" into its exception
        end = pos + n
        self.pos = end
        return buf[pos:end]

    def data_frames(self) -> list[bytes] | None:
        """The payloads of every whole FIN text/binary frame (RSV bits clear, unmasked,
        length under 64 KiB) at the head of the buffer, consumed, reading from the socket
        while there is none. Frames returned together were completed by the same socket
        read, so they share its kernel stamp. None when the frame at the head is the
        library's (control, fragment, masked, 64-bit length), or when the peer closed (the
        library's `recv` reports it)."""
        out: list[bytes] = []
        while True:
            buf, pos = self.buf, self.pos
            size = len(buf)
            theirs = False
            while size - pos >= 2:
                head = buf[pos]
                if head != 0x81 and head != 0x82:
                    theirs = True
                    break
                n = buf[pos + 1]
                if n < 126:
                    end = pos + 2 + n
                    if end > size:
                        break
                    out.append(buf[pos + 2:end])
                elif n == 126:
                    if size - pos < 4:
                        break
                    end = pos + 4 + ((buf[pos + 2] << 8) | buf[pos + 3])
                    if end > size:
                        break
                    out.append(buf[pos + 4:end])
                else:
                    theirs = True  # masked (a server must not mask) or a 64-bit length
                    break
                pos = end
            self.pos = pos
            if out:
                return out
            if theirs:
                return None
            more = self.raw_recv(self.size)
            if not more:
                return None
            self.buf = buf[pos:] + more if pos < size else more
            self.pos = 0


def read_ahead(ws: websocket.WebSocket) -> ReadAhead:
    """Route the connection's frame reads through a ReadAhead (after the handshake, which
    reads line by line and leaves nothing buffered)."""
    ahead = ReadAhead(ws._recv)
    ws.frame_buffer.recv = ahead.recv
    return ahead


class Reader(threading.Thread):
    """One connection: connect, read until it ends, exit."""

    def __init__(self, name: str, url: str, out: Inbox, dead_after: float,
                 now_us: Callable[[], int], stats: "ConnectionStats", put_timeout: float = 5.0,
                 streams: frozenset[str] = frozenset(), relay: StampRelay | None = None,
                 headers: tuple[str, ...] = ()):
        self.conn_id = next(_conn_ids)
        self.headers = headers
        super().__init__(name=f"{name}-c{self.conn_id}", daemon=True)
        self.url, self.out, self.dead_after, self.now_us = url, out, dead_after, now_us
        self.streams = streams  # what the connection is subscribed to: its URL's, then SUBSCRIBE / UNSUBSCRIBE
        self.stats, self.put_timeout = stats, put_timeout
        self.relay = relay  # reads the socket in its own process, when given (handlers.ingest.relay)
        self.connected = threading.Event()  # set once the WebSocket handshake completed
        self.delivering = threading.Event()  # set by the first data frame
        self.started_at = time.monotonic()
        self.last_data = self.started_at  # monotonic time of the last read that brought a data frame
        self.error: str | None = None
        self.key_refused = False  # the handshake was answered 401/403: the API key (SBE) is refused
        self._ws: websocket.WebSocket | None = None
        self._sock: stamped.StampedSocket | None = None
        self._closing = False
        self._full_logged = -1e9
        self._full_count = 0

    def run(self) -> None:
        name_os_thread()
        try:
            # the socket timeout is only a backstop: the supervisor judges liveness by data
            # frames (pings reset this timeout), within dead_after
            timeout = 2 * self.dead_after + 1
            if not stamped.via_proxy(self.url):
                self._sock = stamped.connect(self.url, timeout, relay=self.relay)
            self._ws = websocket.create_connection(
                self.url, timeout=timeout, socket=self._sock, skip_utf8_validation=True,
                enable_multithread=True, header=list(self.headers))
            ahead = read_ahead(self._ws)
            if self._closing:
                return
            self.connected.set()
            log.info("connected conn=%d streams_url_bytes=%d", self.conn_id, len(self.url))
            self._read(self._ws, ahead)
        except (websocket.WebSocketException, OSError) as e:
            if not self._closing:
                self.error = f"{type(e).__name__}: {e}"
                self.key_refused = getattr(e, "status_code", None) in (401, 403)
        except Exception as e:  # a bug, not the network: logged with its traceback; the supervisor replaces the connection
            self.error = f"{type(e).__name__}: {e}"
            log.critical("reader crashed conn=%d", self.conn_id, exc_info=True)
        finally:
            self._abort()

    def _read(self, ws: websocket.WebSocket, ahead: ReadAhead) -> None:
        recv, fast, now_us, put, out = ws.recv_data, ahead.data_frames, self.now_us, self._put, self.out
        # the kernel's stamp, unless a test runs the collector on its own clock
        sock = self._sock if self.now_us is wall_us else None  # None also through a proxy
        conn_id, stats, monotonic = self.conn_id, self.stats, time.monotonic
        first = True
        while True:
            frames = fast()
            if frames is None:
                opcode, data = recv()
                if opcode == _CLOSE:
                    if not self._closing:
                        self.error = f"closed by server: {bytes(data[2:])[:100]!r}"
                    return
                if opcode not in _DATA:
                    continue
                frames = [data]
            received = sock.stamp_us if sock is not None else now_us()
            try:
                out.put_nowait((WS, received, conn_id, frames), len(frames))
            except queue.Full:
                put((WS, received, conn_id, frames), len(frames))
            if is_data(frames[-1]) or any(map(is_data, frames)):
                self.last_data = monotonic()
                stats.last_frame_us = received
                if first:
                    first = False
                    self.delivering.set()

    def _put(self, item: Item, n: int) -> None:
        """A full queue blocks the reader (TCP back-pressure), loudly; it never drops.
        One error line per connection every 10 s, with the count since the last one."""
        self.stats.queue_full += 1
        now = time.monotonic()
        if now - self._full_logged >= 10.0:
            log.error("queue full conn=%d size=%d times=%d: the processor is behind; reader waits",
                      self.conn_id, self.out.maxsize, self.stats.queue_full - self._full_count)
            self._full_logged, self._full_count = now, self.stats.queue_full
        self.out.put(item, n)

    def control(self, method: str, streams: list[str]) -> None:
        """SUBSCRIBE or UNSUBSCRIBE `streams` on this connection (from its supervisor's
        thread; websocket-client serialises sends). The reply, `{"result":null,"id":N}`,
        reaches the processor with the data, which logs an error reply."""
        ws = self._ws
        if ws is None:
            return
        ws.send(json.dumps({"method": method, "params": streams, "id": next(_control_ids)}))
        self.streams = self.streams | set(streams) if method == "SUBSCRIBE" else self.streams - set(streams)
        log.info("%s conn=%d streams=%d: %s", method.lower(), self.conn_id, len(streams),
                 " ".join(streams[:6]) + (" ..." if len(streams) > 6 else ""))

    def fallen_back(self) -> bool:
        """Reading its own socket although a relay should (the relay was down when it connected)."""
        sock = self._sock
        return self.relay is not None and sock is not None and sock.kernel and sock.relayed is None

    def silent_for(self, now: float) -> float:
        """Seconds since the last data frame (or since the connection was started)."""
        return now - self.last_data

    def close(self) -> None:
        """Ask the connection to end (from another thread); recv_data() then returns or raises.
        What its stamp relay read but has not forwarded yet (up to FORWARD_AFTER of it) is
        read first (`_drain`)."""
        self._closing = True
        self._drain()
        ws = self._ws
        if ws is not None:
            try:
                ws.send_close()  # bounded by the socket's timeout
            except (websocket.WebSocketException, OSError):
                pass  # the connection is already gone: closing it is what we wanted
        self._abort()

    def _drain(self) -> None:
        """A relayed connection ends with what its relay holds for it: its reads wait up to
        FORWARD_AFTER in the relay, and closing the pair would drop them (make-before-break
        closes the connection being replaced while it still delivers). Shutting the TCP
        socket for reading makes the relay read the end at once and forward everything with
        it; this reader takes those records, then the end, and exits (at most DRAIN_WAIT)."""
        sock = self._sock
        if sock is None or sock.relayed is None or threading.current_thread() is self or not self.is_alive():
            return
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            return  # already gone: nothing held
        self.join(DRAIN_WAIT)

    def _abort(self) -> None:
        ws = self._ws
        if ws is not None:
            try:
                ws.abort()
                ws.close(timeout=0)
            except (websocket.WebSocketException, OSError):
                pass  # already closed
        elif self._sock is not None:  # the WebSocket handshake did not complete
            self._sock.close()


class ConnectionStats:
    """One copy's connection counters (a copy: one of the connections reading a batch)."""

    def __init__(self) -> None:
        self.connects = 0
        self.failures = 0
        self.rotations = 0
        self.dead = 0  # connections replaced for delivering no data for ws_dead_after
        self.queue_full = 0
        self.last_frame_us = 0
        self.last_attempt = 0.0  # monotonic


class AttemptLimiter:
    """Connection attempts per IP: spot allows 300 per 5 minutes; stay well below, shared
    by every supervisor of a market."""

    def __init__(self, limit: int = 250, window: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self.times: list[float] = []
        self.lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        while True:
            with self.lock:
                now = self.clock()
                self.times = [t for t in self.times if now - t < self.window]
                if len(self.times) < self.limit:
                    self.times.append(now)
                    return True
                wait = self.window - (now - self.times[0])
            log.warning("connection attempts at the limit (%d per %.0fs); waiting %.1fs", self.limit, self.window, wait)
            if stop.wait(max(0.05, wait)):
                return False


class BatchCopies:
    """The `n` connections that read one batch of streams at the same time.

    They coordinate so that two of them are never changing at once:
    - one copy connects at a time (`opening`): at start they come up one after another,
      and after a cut that hit all of them they reconnect in turn;
    - copy k's rotations fall on its own slots, `t0 + (k/n + j) * rotate_after`, so that
      they are spread evenly over the rotation period and no connection is older than
      `rotate_after`; a rotation for age waits until every other copy delivers.
    It also keeps the batch's live count, and logs when the batch runs on fewer
    connections than configured and when it is whole again.

    The batch's streams can change while it runs (symbols listed and halted): `streams`
    is what every copy should read. A copy connects with the streams of that moment in its
    URL, and its supervisor brings a live connection in line with SUBSCRIBE / UNSUBSCRIBE,
    one message of each kind per turn (0.5 s), within the exchange's 5 (spot) or 10
    control messages a second per connection."""

    def __init__(self, name: str, n: int, rotate_after: float, clock: Callable[[], float] = time.monotonic,
                 ws_url: str = "", streams: list[str] | None = None, capacity: int = 1024, query: str = "",
                 headers: tuple[str, ...] = ()):
        self.name, self.n, self.rotate_after, self.clock = name, n, rotate_after, clock
        self.ws_url, self.capacity, self.query = ws_url, capacity, query
        self.headers = headers  # of the handshake (SBE: X-MBX-APIKEY; secret: never logged)
        self.streams: tuple[str, ...] = tuple(streams or ())
        self.t0 = clock()
        self.opening = threading.Lock()
        self.members: list[StreamBatch] = []
        self._lock = threading.Lock()
        self._reported: int | None = None  # live count last logged; None while the copies first come up

    def url(self) -> tuple[str, frozenset[str]]:
        """The combined-stream URL for the batch's streams now, and those streams."""
        streams = self.streams
        return combined_url(self.ws_url, list(streams), self.query), frozenset(streams)

    def room(self) -> int:
        """Streams that can still be added."""
        return self.capacity - len(self.streams)

    def change(self, add: Iterable[str] = (), drop: Iterable[str] = ()) -> None:
        """What the copies should read from now on (their supervisors follow within a turn)."""
        with self._lock:
            gone = set(drop)
            kept = tuple(s for s in self.streams if s not in gone)
            self.streams = kept + tuple(s for s in add if s not in kept)

    def in_line(self) -> bool:
        """Every live copy reads exactly the batch's streams."""
        want = frozenset(self.streams)
        return all(m.reader.streams == want for m in self.members if m.reader is not None and m.reader.is_alive())

    def next_rotation(self, copy: int, started: float) -> float:
        """The first of copy `copy`'s rotation slots after `started` (monotonic)."""
        period = self.rotate_after
        phase = self.t0 + period * copy / self.n
        return phase + (math.floor((started - phase) / period) + 1) * period

    def live(self) -> int:
        return sum(1 for m in self.members if m.live())

    def others_live(self, me: "StreamBatch") -> bool:
        return all(m.live() for m in self.members if m is not me)

    def note_change(self) -> None:
        """A copy's connection came or went: say so when the batch's live count changed."""
        with self._lock:
            live = self.live()
            starting = self._reported is None and self.clock() - self.t0 < 30.0
            if live == self._reported or (starting and live < self.n):
                return
            first, self._reported = self._reported is None, live
        if first and live == self.n:
            return
        if live < self.n:
            log.warning("batch %s runs on %d/%d connections%s", self.name, live, self.n,
                        "" if live else ": nothing is being received for its streams")
        else:
            log.info("batch %s back on %d/%d connections", self.name, live, self.n)


class StreamBatch(PipelineThread):
    """Supervisor of one copy of a batch of streams: keeps one connection reading it."""

    # RESTART: its connection is closed and a new one opened (the batch's other copies
    # read on meanwhile; at ws_redundancy 1 a `reconnect` gap at worst)
    on_crash = RESTART

    def __init__(self, name: str, copies: BatchCopies, out: Inbox, stop: threading.Event,
                 now_us: Callable[[], int], dead_after: float, rotate_after: float,
                 healthy_after: float = 5.0, attempts: AttemptLimiter | None = None, copy: int = 0,
                 relay: StampRelay | None = None):
        super().__init__(name=name, daemon=True)
        self.relay = relay
        self.out, self.stop, self.now_us = out, stop, now_us
        self.dead_after, self.rotate_after, self.healthy_after = dead_after, rotate_after, healthy_after
        self.attempts = attempts or AttemptLimiter()
        self.copies = copies
        self.copy = copy
        self.copies.members.append(self)
        self.rotate_now = threading.Event()  # set on serverShutdown
        self.quiet = 0  # silent replacements in a row with no data between (the batch's streams are quiet)
        self.stats = ConnectionStats()
        self.reader: Reader | None = None

    def fallen_back(self) -> bool:
        """Its connection reads its own socket while its relay should (counted in the metrics)."""
        r = self.reader
        return r is not None and r.connected.is_set() and r.fallen_back()

    def live(self) -> bool:
        """Connected and delivering data within the last `dead_after` seconds."""
        r = self.reader
        return (r is not None and r.is_alive() and r.delivering.is_set()
                and r.silent_for(time.monotonic()) <= self.dead_after)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.recover()

    def recover(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.close()
            reader.join(timeout=5)

    def loop(self) -> None:
        # A connection that worked for `healthy_after` seconds and then ended is replaced at
        # once (every second offline is data lost); failed attempts back off exponentially.
        attempt = 0
        while not self.stop.is_set():
            if not self.copies.streams:  # every symbol of the batch stopped trading
                self.stop.wait(0.5)
                continue
            reader = self._open()
            lifetime = 0.0 if reader is None else self._watch(reader)
            self.copies.note_change()
            if self.stop.is_set():
                return
            attempt = 0 if lifetime >= self.healthy_after else attempt + 1
            delay = backoff_delay(attempt - 1) if attempt else 0.0
            if delay:
                log.info("reconnecting in %.1fs attempt=%d", delay, attempt)
                self.stop.wait(delay)

    def _open(self, replacing: Reader | None = None) -> Reader | None:
        """A new connection that delivers, or None. One copy of a batch connects at a time."""
        while not self.copies.opening.acquire(timeout=0.2):
            if self.stop.is_set():
                return None
        try:
            return self._connect(replacing)
        finally:
            self.copies.opening.release()
            self.copies.note_change()

    def _connect(self, replacing: Reader | None) -> Reader | None:
        """Open a connection; it counts once it delivers data, or, when there is nothing to
        compare it with (a first connection, or one replacing a connection that is silent
        too: the streams may just be quiet), once its handshake is done. Then the
        connection it replaces, if any, is closed (make-before-break)."""
        if not self.attempts.acquire(self.stop):
            return None
        need_data = replacing is not None and replacing.silent_for(time.monotonic()) <= self.dead_after
        url, streams = self.copies.url()
        reader = Reader(self.name, url, self.out, self.dead_after, self.now_us, self.stats, streams=streams,
                        relay=self.relay, headers=self.copies.headers)
        self.stats.connects += 1
        self.stats.last_attempt = time.monotonic()
        reader.start()
        ready = reader.delivering if need_data else reader.connected
        while not ready.wait(0.2):
            if not reader.is_alive() or self.stop.is_set():
                if reader.key_refused:
                    self.stats.failures += 1
                    log.error("connection failed conn=%d: the exchange refused the API key (HTTP 401/403); check "
                              "BINANCE_API_KEY (an Ed25519 key, its IP restrictions); retrying with backoff",
                              reader.conn_id)
                elif reader.error:
                    self.stats.failures += 1
                    log.warning("connection failed conn=%d error=%s", reader.conn_id, reader.error)
                reader.close()
                return None
            if time.monotonic() - reader.started_at > self.dead_after:
                self.stats.failures += 1
                log.warning("connection %s in %.0fs conn=%d; giving up on it", "delivered no data" if need_data
                            else "not established", self.dead_after, reader.conn_id)
                reader.close()
                return None
        self.reader = reader
        if replacing is not None:
            replacing.close()
            replacing.join(timeout=5)
        return reader

    def _watch(self, reader: Reader) -> float:
        """Wait while the reader lives and delivers; replace it when it is silent and
        rotate it when due. Returns its lifetime when it is gone."""
        rotate_at = self.copies.next_rotation(self.copy, reader.started_at)
        back_at = 0.0  # a failed move back to the relay is tried again 10 s later
        while not self.stop.wait(0.5):
            now = time.monotonic()
            if not reader.is_alive():
                self.stats.failures += 1
                log.warning("connection lost conn=%d after %.0fs error=%s", reader.conn_id,
                            now - reader.started_at, reader.error)
                self._report_loss(reader)
                return self._lost(reader, now)
            self.copies.note_change()
            if reader.connected.is_set() and reader.streams != frozenset(self.copies.streams):
                if not self.copies.streams:
                    log.info("batch %s has no streams left: closing conn=%d", self.copies.name, reader.conn_id)
                    reader.close()
                    return self._lost(reader, now)
                self._follow(reader)
            silent = reader.silent_for(now)
            if reader.delivering.is_set() and silent <= self.dead_after:
                self.quiet = 0
            if silent > self.dead_after * 2 ** self.quiet:
                self.stats.dead += 1
                if self.copies.others_live(self):
                    log.warning("connection dead conn=%d: no data frame for %.1fs (pings and control replies do "
                                "not count); replacing it", reader.conn_id, silent)
                    reader.close()
                    self._report_loss(reader)
                    return self._lost(reader, now)
                new = self._replace_silent(reader, silent)
                if new is not None:
                    reader = new
                    rotate_at = self.copies.next_rotation(self.copy, reader.started_at)
                continue
            shutdown = self.rotate_now.is_set()
            # a connection that fell back to reading its own socket moves to its relay once
            # the relay is up again, make-before-break like a rotation
            back = now >= back_at and reader.fallen_back() and self.relay is not None and self.relay.alive()
            if shutdown or ((now >= rotate_at or back) and self.copies.others_live(self)):
                # serverShutdown cannot wait: the server is about to close this connection
                self.rotate_now.clear()
                reason = "serverShutdown" if shutdown else "age" if now >= rotate_at else "relay up again"
                log.info("rotating conn=%d after %.0fs reason=%s (make-before-break)",
                         reader.conn_id, now - reader.started_at, reason)
                new = self._open(replacing=reader)
                if new is not None:
                    self.stats.rotations += 1
                    reader = new
                    rotate_at = self.copies.next_rotation(self.copy, reader.started_at)
                else:
                    # keep the old connection; try again later
                    rotate_at = max(rotate_at, time.monotonic() + min(60.0, self.rotate_after / 10))
                    back_at = time.monotonic() + 10.0
        return time.monotonic() - reader.started_at

    def _follow(self, reader: Reader) -> None:
        """SUBSCRIBE what the batch gained, UNSUBSCRIBE what it lost (one message each)."""
        want = frozenset(self.copies.streams)
        add, drop = sorted(want - reader.streams), sorted(reader.streams - want)
        try:
            if add:
                reader.control("SUBSCRIBE", add)
            if drop:
                reader.control("UNSUBSCRIBE", drop)
        except (websocket.WebSocketException, OSError) as e:
            log.warning("subscription change failed conn=%d error=%s; the next connection opens with them",
                        reader.conn_id, type(e).__name__)

    def _replace_silent(self, reader: Reader, silent: float) -> Reader | None:
        """A silent connection with no other copy of its batch delivering: either it is
        dead, or every stream of the batch is quiet. It is replaced make-before-break (the
        new one counts once connected), so that nothing is lost if the streams were only
        quiet; if the new one brings nothing either, the next check waits twice as long
        (up to 32 x ws_dead_after), so that a quiet batch is not reconnected every few
        seconds."""
        log.warning("connection dead conn=%d: no data frame for %.1fs (pings and control replies do not count), "
                    "and no other connection of the batch delivers; replacing it make-before-break",
                    reader.conn_id, silent)
        new = self._open(replacing=reader)
        if new is not None:
            self.quiet = min(self.quiet + 1, 5)
        return new

    def _report_loss(self, reader: Reader) -> None:
        """Tell the processor that a connection ended unexpectedly (its symbols' quality
        record counts it); never waits for a full inbox (the count is then missing, said so)."""
        try:
            self.out.put_nowait((LOST, wall_us(), (reader.conn_id, tuple(reader.streams))))
        except queue.Full:
            log.warning("connection loss conn=%d not counted in the quality record: the inbox is full", reader.conn_id)

    def _lost(self, reader: Reader, now: float) -> float:
        self.reader = None
        # it counts as healthy (reconnect at once) only if it delivered data
        return now - reader.started_at if reader.delivering.is_set() else 0.0
