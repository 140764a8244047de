"""The stamp relay (handlers/ingest/relay.py, relay_process.py): the process that reads the
WebSocket connections' sockets as bytes arrive. Real TCP connections on 127.0.0.1, a real
relay process; what is asserted is what the collector's readers get: the bytes, in order,
and their stamps."""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import signal
import socket
import struct
import threading
import time

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from handlers.ingest import relay as relay_module
from handlers.ingest import stamped
from handlers.ingest.inbox import Inbox
from handlers.ingest.relay import StampRelay, compiled_loop
from handlers.ingest.relay_process import EAGER_READS, FORWARD_AFTER, FORWARD_BYTES, HOLD_LIMIT, next_forward
from handlers.ingest.websocket import ConnectionStats, Reader, combined_url
from service.supervisor import Supervisor
from simulator import Simulator

pytestmark = pytest.mark.skipif(not stamped.StampedSocket(socket.socket()).kernel,
                                reason="needs the kernel's receive stamps (Linux)")


class Server:
    """One TCP connection's server side, driven by the test."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.conn: socket.socket | None = None
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.conn, _ = self.listener.accept()
        self.accepted.set()

    def send(self, data: bytes) -> tuple[int, int]:
        """µs before and after the bytes were handed to the kernel (on loopback, in the
        peer's socket when the call returns)."""
        assert self.accepted.wait(5) and self.conn is not None
        before = stamped.wall_us()
        self.conn.sendall(data)
        return before, stamped.wall_us()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture(params=["compiled", "python"])
def loop(request):
    """Every relay test runs against both of the relay's loops: the compiled one, which the
    collector runs where it was built (scripts/build-relay.sh, run by scripts/test.sh), and
    the Python one, the plain version it is held to."""
    if request.param == "compiled":
        assert compiled_loop() is not None, "the compiled loop is not built: scripts/build-relay.sh"
    return request.param


@pytest.fixture
def relay(loop):
    r = StampRelay("stamp-relay-t", loop=loop)
    assert r.start()
    yield r
    r.close()


def read_exactly(sock: stamped.StampedSocket, n: int) -> list[tuple[bytes, int]]:
    out, got = [], 0
    while got < n:
        data = sock.recv(1 << 16)
        assert data, "closed early"
        out.append((data, sock.stamp_us))
        got += len(data)
    return out


@pytest.mark.parametrize("relayed", [True, False])
def test_bytes_keep_their_arrival_time_while_the_reader_is_late(relay, relayed):
    server = Server()
    sock = stamped.connect(server.url, timeout=5, relay=relay if relayed else None)
    try:
        assert (sock.relayed is not None) == relayed
        a_sent = server.send(b"a" * 100)
        time.sleep(1.0)  # the relay has long read A
        b_sent = server.send(b"b" * 100)
        time.sleep(0.3)  # the reader comes late: both writes wait for it
        reads = read_exactly(sock, 200)
    finally:
        sock.close()
        server.close()
    if relayed:  # two reads, each with its own write's arrival time
        assert [data for data, _ in reads] == [b"a" * 100, b"b" * 100]
        (_, a_stamp), (_, b_stamp) = reads
        assert a_sent[0] <= a_stamp <= a_sent[1]
        assert b_sent[0] <= b_stamp <= b_sent[1]
    else:  # the reader's own late read: A takes B's arrival time (what the relay is for)
        assert reads == [(b"a" * 100 + b"b" * 100, reads[0][1])]
        assert b_sent[0] <= reads[0][1] <= b_sent[1]


def test_a_relay_that_reads_late_still_stamps_the_arrival(loop):
    """The stamp is the kernel's arrival time, not the time of the relay's read: a relay
    stopped for 300 ms (SIGSTOP, as a box too busy to run it) stamps bytes that arrived
    meanwhile with their arrival."""
    relay = StampRelay("stamp-relay-s", forward_after=0.05, loop=loop)
    assert relay.start() and relay._proc is not None
    server = Server()
    sock = stamped.connect(server.url, timeout=5, relay=relay)
    try:
        assert sock.relayed is not None
        for i in range(EAGER_READS):  # the eager reads spent, as a live connection's are
            server.send(b"%d" % i)
            read_exactly(sock, 1)
        os.kill(relay._proc.pid, signal.SIGSTOP)
        try:
            sent = server.send(b"late")
            time.sleep(0.3)
        finally:
            os.kill(relay._proc.pid, signal.SIGCONT)
        reads = read_exactly(sock, 4)
    finally:
        sock.close()
        server.close()
        relay.close()
    assert reads == [(b"late", reads[0][1])]
    # within the write (a read's time would be 300 ms later); a margin of 1 ms below for the
    # rare kernel stamp a little before the sender's own clock reading (seen once, 127 µs)
    assert sent[0] - 1000 <= reads[0][1] <= sent[1], (sent, reads)


def test_a_connection_shut_for_reading_gets_what_its_relay_held_then_its_end(loop):
    """A relay holds a connection's reads until its next forwarding moment (here an hour
    away), except the first EAGER_READS (the handshakes). When the collector closes a
    connection that still delivers (make-before-break), it first shuts the socket for
    reading: the relay then forwards what it holds at once, with the end, so the bytes
    the connection received are not lost with it (without that, this recv waits an hour
    and times out)."""
    relay = StampRelay("stamp-relay-h", forward_after=3600, loop=loop)
    assert relay.start()
    server = Server()
    sock = stamped.connect(server.url, timeout=10, relay=relay)
    try:
        assert sock.relayed is not None
        for i in range(EAGER_READS):  # each its own read, forwarded at once
            sent = server.send(b"eager %d" % i)
            assert read_exactly(sock, len(b"eager %d" % i)) == [(b"eager %d" % i, sock.stamp_us)]
            assert sent[0] <= sock.stamp_us
        held = [server.send(b"held %d" % i) for i in range(3)]
        time.sleep(0.2)  # read by the relay (and, were it not, read at the end just the same)
        sock.shutdown(socket.SHUT_RD)
        reads = []
        while data := sock.recv(1 << 16):
            reads.append((data, sock.stamp_us))
    finally:
        sock.close()
        server.close()
        relay.close()
    assert b"".join(data for data, _ in reads) == b"held 0held 1held 2"
    assert all(held[0][0] <= stamp for _, stamp in reads)


def test_a_connection_closed_while_it_delivers_keeps_what_its_relay_held(loop):
    """Make-before-break closes the connection being replaced while it still delivers. The
    frames its relay read but had not forwarded (here it would forward them an hour later)
    reach the inbox before close() returns: every frame the simulator handed to the socket
    before the close is there."""
    relay = StampRelay("stamp-relay-h", forward_after=3600, loop=loop)
    assert relay.start()
    inbox = Inbox()
    try:
        with Simulator(spot=dict(symbols=["BTCUSDT"], record=True)) as sim:
            url = combined_url(sim.spot.ws_url, ["btcusdt@depth@100ms"])
            reader = Reader("ws-spot-0a", url, inbox, 5.0, stamped.wall_us, ConnectionStats(), relay=relay)
            reader.start()
            assert reader.delivering.wait(10)  # its first reads went on at once (EAGER_READS)
            time.sleep(1.5)  # frames every 100 ms: more than EAGER_READS reads, the rest held
            closing = time.time()
            reader.close()
            reader.join(5)
            sent = [s.data for s in sim.spot.sent if s.t < closing]
    finally:
        relay.close()
    got = []
    while inbox.qsize():
        got.extend(inbox.get_nowait()[3])
    assert len(sent) > EAGER_READS + 5
    everything = b"\n".join(got)
    assert [data for data in sent if data not in everything] == []


class WebSocketServer(Server):
    """A WebSocket server of a few lines: the handshake, then frames written as the test says."""

    def handshake(self) -> None:
        assert self.accepted.wait(10) and self.conn is not None
        request = b""
        while b"\r\n\r\n" not in request:
            request += self.conn.recv(4096)
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        self.conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")

    def reset(self) -> None:
        """Gone with a TCP reset: the client's next write fails."""
        assert self.conn is not None
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.conn.close()
        self.conn = None


def text(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


def test_frames_behind_a_ping_are_read_when_the_pong_cannot_be_sent(loop):
    """The exchange pings, sends more frames and goes (a reset); the reader comes to the ping
    only later (its relay forwards at its next moment, here the end) and its pong finds the
    connection gone. The frames after the ping were delivered: they reach the inbox, and the
    connection ends with the reset, not with the failed write."""
    relay = StampRelay("stamp-relay-h", forward_after=3600, loop=loop)
    assert relay.start()
    server = WebSocketServer()
    inbox = Inbox()
    reader = Reader("ws-spot-0a", server.url + "stream", inbox, 5.0, stamped.wall_us, ConnectionStats(), relay=relay)
    reader.start()
    frames = []
    try:
        server.handshake()
        for i in range(EAGER_READS):  # fillers, until the relay holds a read (its first go on at once)
            frames.append(b'{"stream":"x","data":{"filler":%d}}' % i)
            server.send(text(frames[-1]))
            try:
                inbox.get(timeout=2)
            except Exception:
                break  # held: the handshakes and the fillers spent the eager reads
        tail = [b'{"stream":"x","data":{"after":%d}}' % i for i in range(3)]
        server.send(b"\x89\x00" + b"".join(map(text, tail)))  # a ping, then the frames
        server.reset()
        reader.join(10)
    finally:
        reader.close()
        server.close()
        relay.close()
    got = []
    while inbox.qsize():
        got.extend(inbox.get_nowait()[3])
    assert not reader.is_alive()
    assert set(tail) <= set(got)
    assert reader.error is not None and "Reset" in reader.error, reader.error


def test_many_writes_each_keep_their_own_stamp_whatever_the_relay_batches(relay):
    """Writes of random sizes at random pauses (some shorter than the relay's forwarding
    delay, some longer, a burst past FORWARD_BYTES): the reader gets every byte in order,
    each read stamped with the arrival of its newest bytes, whatever the relay forwarded
    together."""
    rng = random.Random(7)
    sizes = [rng.choice((1, 40, 300, 1500, 9000)) for _ in range(120)] + [3 * FORWARD_BYTES]
    server = Server()
    sock = stamped.connect(server.url, timeout=5, relay=relay)
    sent = []
    try:
        for i, size in enumerate(sizes):
            data = bytes([i % 251]) * size
            sent.append((data, *server.send(data)))
            time.sleep(rng.choice((0.0005, 0.002, FORWARD_AFTER * 1.5)))
        reads = read_exactly(sock, sum(sizes))
        read_at = stamped.wall_us()
    finally:
        sock.close()
        server.close()
    assert b"".join(data for data, _ in reads) == b"".join(data for data, _, _ in sent)
    pos, stamps_by_byte = 0, []  # (first byte, end, stamp) of each read
    for data, stamp in reads:
        stamps_by_byte.append((pos, pos + len(data), stamp))
        pos += len(data)
    assert [stamp for _, _, stamp in stamps_by_byte] == sorted(stamp for _, _, stamp in stamps_by_byte)
    # A read's stamp is the arrival of the newest bytes it holds, those of the write of its
    # last byte: never before that write began (TCP may deliver a write after the call
    # returned, so its end is no bound), never after the test read it
    ends, start = [], 0
    for data, before, _ in sent:
        start += len(data)
        ends.append((start, before))
    for lo, hi, stamp in stamps_by_byte:
        own = next(i for i, (end, _) in enumerate(ends) if end >= hi)  # the write of the read's last byte
        assert ends[own][1] <= stamp <= read_at, (lo, hi, stamp, ends[own])
    # records forwarded together keep their own stamps (121 writes over more than a second)
    assert len({stamp for _, _, stamp in stamps_by_byte}) > len(sizes) // 2


def test_a_reader_that_stops_reading_holds_the_sender_back_and_loses_nothing(relay):
    """The relay holds at most HOLD_LIMIT for a reader that does not read, then leaves the
    bytes in TCP: the sender waits (back-pressure), and every byte arrives in order."""
    size = 64 << 20
    payload = bytes(range(256)) * (size // 256)
    server = Server()
    sock = stamped.connect(server.url, timeout=10, relay=relay)
    done = threading.Event()

    def send() -> None:
        server.send(payload)
        done.set()

    threading.Thread(target=send, daemon=True).start()
    try:
        time.sleep(2.0)
        # TCP's buffers, the pair's and the relay's HOLD_LIMIT hold far less than 64 MiB
        assert not done.is_set()
        assert size > 8 * HOLD_LIMIT
        digest, got = hashlib.sha256(), 0
        while got < size:
            data = sock.recv(1 << 16)
            assert data
            digest.update(data)
            got += len(data)
        assert got == size and digest.digest() == hashlib.sha256(payload).digest()
        assert done.wait(10)
    finally:
        sock.close()
        server.close()


def test_the_peer_closing_and_the_reader_closing_both_end_the_connection(relay):
    server = Server()
    sock = stamped.connect(server.url, timeout=5, relay=relay)
    server.send(b"last words")
    assert server.conn is not None
    server.conn.shutdown(socket.SHUT_WR)
    assert read_exactly(sock, 10)[0][0] == b"last words"
    assert sock.recv(100) == b""  # the peer's close, as a socket reports it
    sock.close()
    # the relay let go of its copy of the socket too: the server sees the connection end
    server.conn.settimeout(5)
    assert server.conn.recv(100) == b""
    server.close()


def test_a_relay_that_died_ends_its_connections_and_is_started_again_by_the_supervisor(relay, caplog):
    server = Server()
    sock = stamped.connect(server.url, timeout=5, relay=relay)
    first = relay._proc
    assert first is not None
    first.kill()
    first.wait()
    with pytest.raises(ConnectionResetError, match="stamp relay"):
        sock.recv(100)  # the reader's error: its supervisor reconnects
    sock.close()
    server.close()
    # while it is down, a new connection reads its own socket (at once: nothing waits for a start)
    down = Server()
    sock = stamped.connect(down.url, timeout=5, relay=relay)
    assert sock.relayed is None
    down.send(b"own")
    assert read_exactly(sock, 3)[0][0] == b"own"
    sock.close()
    down.close()
    supervisor = Supervisor(threading.Event())
    supervisor.add_helper(relay)
    with caplog.at_level(logging.INFO):
        assert supervisor.watch() is None
    assert "stamp-relay-t is down (exit status -9); starting it again" in caplog.text
    assert supervisor.restarts() == {"stamp-relay-t": 1} and supervisor.helpers_up() == (1, 1)
    again = Server()
    sock = stamped.connect(again.url, timeout=5, relay=relay)
    assert sock.relayed is not None and relay._proc is not None and relay._proc.pid != first.pid
    again.send(b"hello")
    assert read_exactly(sock, 5)[0][0] == b"hello"
    sock.close()
    again.close()


def test_the_relay_ends_when_the_collector_lets_go(loop):
    relay = StampRelay("stamp-relay-t", loop=loop)
    assert relay.start()
    server = Server()
    sock = stamped.connect(server.url, timeout=5, relay=relay)
    proc = relay._proc
    assert proc is not None
    relay.close()  # what the supervisor does once every reader ended
    assert proc.returncode == 0
    sock.close()
    server.close()


@given(st.floats(min_value=0, max_value=10**7, allow_nan=False), st.floats(min_value=0, max_value=1))
def test_every_relay_forwards_at_the_same_moments(now, later):
    """A record waits for the next multiple of FORWARD_AFTER of the host's monotonic clock,
    whichever relay holds it: two copies read before such a moment both go on at it."""
    moment = next_forward(now)
    assert now <= moment <= now + FORWARD_AFTER * (1 + 1e-9)  # now itself when it is one (floats)
    assert abs(moment / FORWARD_AFTER - round(moment / FORWARD_AFTER)) < 1e-6
    other = now + later * (moment - now) * 0.999  # another relay's read, before the same moment
    assume(other < moment)  # not rounded up onto the moment itself
    assert next_forward(other) == moment


def test_the_compiled_loop_runs_where_it_was_built_and_the_python_loop_where_not(monkeypatch, caplog):
    """"auto" (the collector's choice) takes the compiled loop when scripts/build-relay.sh
    built it beside the interpreter, the Python loop otherwise, and the start's log line
    says which; asking for the compiled loop where there is none starts nothing."""
    with pytest.raises(ValueError, match="loop must be one of"):
        StampRelay("stamp-relay-t", loop="fast")
    with caplog.at_level(logging.INFO):
        for built in (True, False):
            if not built:  # a machine without a C compiler (this one has one)
                monkeypatch.setattr(relay_module, "compiled_loop", lambda: None)
            relay = StampRelay("stamp-relay-t")
            assert relay.start() and relay._proc is not None
            exe = os.readlink(f"/proc/{relay._proc.pid}/exe")
            relay.close()
            if built:
                assert exe.endswith("/obc-stamp-relay") and "loop=compiled" in caplog.text
            else:
                assert "python" in os.path.basename(exe)
                assert "loop=python (no compiled loop built: scripts/build-relay.sh)" in caplog.text
        assert not StampRelay("stamp-relay-t", loop="compiled").start()
    assert "stamp-relay-t not started: its compiled loop was not built" in caplog.text
