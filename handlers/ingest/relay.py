"""The stamp relay: a small process that reads every WebSocket connection's TCP socket the
moment bytes arrive, and hands them on, each read with its kernel receive time.

Why a process. A read's stamp is the kernel's arrival time of the newest bytes it returns
(`handlers.ingest.stamped`), so frames that wait in the socket for their reader take the stamp of
whatever arrived after them. A reader thread of the collector waits for the GIL behind the
processor, the writers and the other readers; at 40,000 msgs/s that wait made stamps 4-6
ms late at p99, 36 ms at worst (BENCHMARKS.md, Stamp relay). The relay is one thread in
its own interpreter, whose only work is to read and forward, so nothing but the operating
system's scheduler stands between an arrival and its read.

    collector process                                 relay process (python -m handlers.ingest.relay)
    reader thread: connect TCP ── send_fds ─────────► registers the socket (epoll)
      websocket-client / TLS                            TCP readable: recvmsg(), kernel stamp
        reads ◄── unix socketpair ◄── [stamp, n, bytes] records, sent on together (up to 4 MiB held a connection)
        writes ──► the TCP socket itself (pongs, SUBSCRIBE)

A read is made the moment its bytes arrive, but its record need not travel at once: it
carries its own stamp. So a connection's records go on together, 20 ms after the first
of them (or once 64 KiB wait): where every read brings one frame (every-event streams,
quiet symbols) the reader thread wakes once for several reads instead of once a read,
which halved its CPU (BENCHMARKS.md, "Per read"). Delivery, not the stamps, is what
waits; liveness is judged in seconds.

The collector keeps the TCP socket for everything but reads: TLS, the WebSocket handshake,
pongs and SUBSCRIBE go out as before, and TLS decrypts what the records bring. A record is
`<q stamp_us><I n>` then n bytes; n == 0 ends the stream: stamp 0 for the peer's close, or
minus the errno of a failed read. A collector that closes its end of the pair ends the
relay's copy of the TCP socket too; the relay exits when its control socket closes (the
collector stopped or died).

Where the relay cannot run (not Linux, no kernel stamps), or while it is down, connections
are read by their reader thread as before (`StampedSocket` without a relay).
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from handlers.ingest.timestamps import ANC_SPACE, TIMESPEC, stamp_of, wall_us
from service.helpers import spawn

log = logging.getLogger(__name__)

RECORD = struct.Struct("<qI")
READ_SIZE = 1 << 16
HOLD_LIMIT = 4 << 20  # bytes held for a collector end that is not reading, before TCP is left to wait
FORWARD_AFTER = 0.02  # s a read's record may wait for the next ones of its connection (never its stamp)
FORWARD_BYTES = 1 << 16  # ... unless this much waits
_IOV_MAX = 1024  # pieces a sendmsg takes (Linux's UIO_MAXIOV)
_PIPE_READ = 1 << 18
READY_WAIT = 30.0  # s for a new relay to say it is ready (an interpreter's start on a loaded box)


class RelayedReads:
    """The collector's end of one connection's socketpair: `read(n)` returns the next bytes
    of the TCP stream and the kernel stamp of the relay read that brought them."""

    def __init__(self, pipe: socket.socket):
        self.pipe = pipe
        self._buf = b""
        self._pos = 0
        self._left = b""  # what a short read left of the current record
        self._stamp = 0

    def _fill(self, need: int) -> None:
        """At least `need` bytes buffered (raises the socket's timeout, keeping what it has)."""
        while len(self._buf) - self._pos < need:
            more = self.pipe.recv(_PIPE_READ)
            if not more:
                raise ConnectionResetError("the stamp relay closed this connection")
            self._buf = self._buf[self._pos:] + more
            self._pos = 0

    def read(self, n: int) -> tuple[bytes, int]:
        if self._left:
            data, self._left = self._left[:n], self._left[n:]
            return data, self._stamp
        self._fill(RECORD.size)
        stamp, size = RECORD.unpack_from(self._buf, self._pos)
        if size == 0:
            self._pos += RECORD.size
            if stamp < 0:
                raise OSError(-stamp, os.strerror(-stamp))
            return b"", wall_us()  # the close itself carries no stamp
        self._fill(RECORD.size + size)
        start = self._pos + RECORD.size
        self._pos = start + size
        self._stamp = stamp
        if size <= n:
            return self._buf[start:start + size], stamp
        self._left = self._buf[start + n:start + size]
        return self._buf[start:start + n], stamp


class StampRelay:
    """The collector's handle on one relay process, a helper (`service.helpers`): started by
    the supervisor before any reader needs it, restarted by it (with a backoff) when it
    dies. Readers only ask for it (`adopt`); while it is down they read their own sockets
    and come back to it once it is up (`handlers.ingest.websocket`). `name` is the
    process's name for ps and top (15 bytes)."""

    def __init__(self, name: str = "stamp-relay") -> None:
        self.name = name
        self.restarts = 0  # starts after the first (the supervisor counts them)
        self._lock = threading.Lock()  # adopt() against start() and close(): held for a send, never a start
        self._proc: subprocess.Popen | None = None
        self._ctrl: socket.socket | None = None

    def start(self) -> bool:
        """Start the relay process and wait for its ready byte (at most READY_WAIT)."""
        ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # a message per connection
        try:
            proc = spawn("handlers.ingest.relay", [str(theirs.fileno()), self.name], pass_fds=[theirs.fileno()])
        except OSError as e:
            log.error("%s not started (%s): readers read their sockets themselves", self.name, e)
            ctrl.close()
            return False
        finally:
            theirs.close()
        try:
            ctrl.settimeout(READY_WAIT)
            if ctrl.recv(1) != b"r":
                raise OSError("it ended before it was ready")
        except OSError as e:  # a timeout too
            log.error("%s not ready (%s): readers read their sockets themselves", self.name, e)
            ctrl.close()
            _reap(proc)
            return False
        with self._lock:
            self._proc, self._ctrl = proc, ctrl
        log.info("%s started pid=%d", self.name, proc.pid)
        return True

    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None and self._ctrl is not None

    def exit_status(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.poll()

    def adopt(self, tcp: socket.socket) -> socket.socket | None:
        """Hand `tcp`'s reads to the relay; the socket to read them from instead, or None
        when the relay is down (the caller reads `tcp` itself)."""
        if not self.alive():
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                if self._ctrl is None:
                    ours.close()
                    return None
                socket.send_fds(self._ctrl, [b"c"], [tcp.fileno(), theirs.fileno()])
            return ours
        except OSError as e:
            log.error("%s: could not hand over a connection (%s); its reader reads it", self.name, e)
            ours.close()
            return None
        finally:
            theirs.close()

    def close(self) -> None:
        """End the relay (closing the control socket is its signal) and reap it."""
        with self._lock:
            ctrl, self._ctrl = self._ctrl, None
            proc, self._proc = self._proc, None
        if ctrl is not None:
            ctrl.close()
        if proc is not None:
            _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the relay process ------------------------------------------------------------------

class _Conn:
    """One relayed connection: its TCP socket (shared with the collector, read only here)
    and the relay's end of the pair. `out`: the records not yet forwarded, header and
    bytes as separate pieces (one `sendmsg` takes them all)."""

    def __init__(self, tcp: socket.socket, pipe: socket.socket):
        self.tcp, self.pipe = tcp, pipe
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.writable_wait = False  # the pair was full: waiting for EPOLLOUT
        self.reading = True
        self.ended = False  # the end record is queued


class _Relay:
    """The relay's loop: epoll over the control socket, every connection's TCP socket (to
    read) and its end of the pair (to notice the collector closing it; to write when the
    pair was full).

    Reads are made the moment bytes arrive (that is what keeps stamps exact); forwarding
    them is not urgent, since each record carries its stamp. So the records of a
    connection are sent on together, FORWARD_AFTER after the first of them (sooner once
    FORWARD_BYTES are waiting, or the connection ended): the reader in the collector then
    wakes once for several reads rather than once a read (BENCHMARKS.md, "Per read")."""

    def __init__(self, ctrl: socket.socket):
        self.ctrl = ctrl
        self.poll = select.epoll()
        self.poll.register(ctrl.fileno(), select.EPOLLIN)
        self.by_fd: dict[int, tuple[_Conn, bool]] = {}  # fd -> (connection, is its TCP socket)
        self.waiting: dict[_Conn, None] = {}  # connections with records not yet sent, in order
        self.due = 0.0  # monotonic time at which the waiting records go

    def run(self) -> None:
        # The loop runs once a read, which on every-event streams is once a frame: what would
        # be calls (`_read`, `_queue`, `stamp_of`) is written out for the common case, a
        # read of some bytes with their stamp (tests/test_relay.py holds it to the records).
        by_fd, waiting = self.by_fd, self.waiting
        poll, monotonic = self.poll.poll, time.monotonic
        pack, timespec, dontwait = RECORD.pack, TIMESPEC.unpack_from, socket.MSG_DONTWAIT
        while True:
            timeout = -1.0
            if waiting:
                timeout = self.due - monotonic()
                if timeout < 0:
                    timeout = 0.0
            for fd, events in poll(timeout):
                entry = by_fd.get(fd)
                if entry is None or not entry[1]:  # the control socket, a pair's end, or gone
                    if not self._event(fd, events):
                        return
                    continue
                conn = entry[0]
                try:
                    data, anc, _, _ = conn.tcp.recvmsg(READ_SIZE, ANC_SPACE, dontwait)
                except OSError:
                    self._read(conn)  # not ready after all, or failed: the general way
                    continue
                if not data or not anc:
                    self._read_done(conn, data, anc)
                    continue
                sec, ns = timespec(anc[0][2])
                conn.out += (pack(sec * 1_000_000 + ns // 1000, len(data)), data)
                conn.out_bytes += RECORD.size + len(data)
                if conn.out_bytes >= FORWARD_BYTES:
                    self._forward(conn)
                elif conn not in waiting:
                    if not waiting:
                        self.due = monotonic() + FORWARD_AFTER
                    waiting[conn] = None
            if waiting and monotonic() >= self.due:
                for conn in list(waiting):
                    self._forward(conn)

    def _event(self, fd: int, events: int) -> bool:
        """One epoll event, the general way; False when the collector is gone."""
        if fd == self.ctrl.fileno():
            return self._accept()
        entry = self.by_fd.get(fd)
        if entry is None:
            return True  # dropped by an earlier event of this round
        conn, tcp = entry
        if tcp:
            self._read(conn)
        elif events & select.EPOLLIN and not self._collector_open(conn):
            self._drop(conn)
        elif events & select.EPOLLOUT:
            self._forward(conn)
        return True

    def _accept(self) -> bool:
        msg, fds, _, _ = socket.recv_fds(self.ctrl, 1, 2)
        if not msg:
            return False  # the collector is gone
        tcp, pipe = socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])
        pipe.setblocking(False)  # the relay's own end; the TCP socket's flags are the collector's
        conn = _Conn(tcp, pipe)
        self.by_fd[tcp.fileno()] = (conn, True)
        self.by_fd[pipe.fileno()] = (conn, False)
        self.poll.register(tcp.fileno(), select.EPOLLIN)
        self.poll.register(pipe.fileno(), select.EPOLLIN)
        return True

    def _read(self, conn: _Conn) -> None:
        try:
            data, anc, _, _ = conn.tcp.recvmsg(READ_SIZE, ANC_SPACE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._end(conn, -(e.errno or errno.EIO))
            return
        self._read_done(conn, data, anc)

    def _read_done(self, conn: _Conn, data: bytes, anc: list) -> None:
        if not data:
            self._end(conn, 0)
            return
        self._queue(conn, RECORD.pack(stamp_of(anc), len(data)), data)

    def _queue(self, conn: _Conn, header: bytes, data: bytes = b"") -> None:
        """A record to forward: it waits for its connection's next forward."""
        if not conn.out and not conn.writable_wait:
            if not self.waiting:
                self.due = time.monotonic() + FORWARD_AFTER
            self.waiting[conn] = None
        conn.out.append(header)
        if data:
            conn.out.append(data)
        conn.out_bytes += len(header) + len(data)
        if conn.ended or conn.out_bytes >= FORWARD_BYTES:
            self._forward(conn)

    def _end(self, conn: _Conn, code: int) -> None:
        if conn.reading:
            self.poll.unregister(conn.tcp.fileno())
            conn.reading = False
        conn.ended = True
        self._queue(conn, RECORD.pack(code, 0))

    def _forward(self, conn: _Conn) -> None:
        """Send what waits for the collector, as much as the pair takes (pieces in one
        `sendmsg`, at most IOV_MAX of them a call); the rest waits for EPOLLOUT."""
        self.waiting.pop(conn, None)
        out = conn.out
        while out:
            pieces = out[:_IOV_MAX]
            try:
                n = conn.pipe.sendmsg(pieces)
            except BlockingIOError:
                n = 0
            except OSError:
                self._drop(conn)
                return
            conn.out_bytes -= n
            k = 0
            while k < len(pieces) and n >= len(pieces[k]):
                n -= len(pieces[k])
                k += 1
            if k < len(pieces):  # the pair is full: keep the rest, in order
                out[:k + 1] = [pieces[k][n:]]
                if not conn.writable_wait:
                    self.poll.modify(conn.pipe.fileno(), select.EPOLLIN | select.EPOLLOUT)
                    conn.writable_wait = True
                if conn.out_bytes > HOLD_LIMIT and conn.reading:
                    self.poll.unregister(conn.tcp.fileno())  # TCP back-pressure until the collector reads again
                    conn.reading = False
                return
            del out[:k]
        if conn.writable_wait:
            self.poll.modify(conn.pipe.fileno(), select.EPOLLIN)
            conn.writable_wait = False
        if conn.ended:
            self._drop(conn)
        elif not conn.reading:
            self.poll.register(conn.tcp.fileno(), select.EPOLLIN)
            conn.reading = True

    def _collector_open(self, conn: _Conn) -> bool:
        try:
            return conn.pipe.recv(1) != b""  # the collector never writes: readable means closed
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _drop(self, conn: _Conn) -> None:
        self.waiting.pop(conn, None)
        conn.out, conn.out_bytes = [], 0
        for s in (conn.tcp, conn.pipe):
            fd = s.fileno()
            if fd >= 0 and self.by_fd.pop(fd, None) is not None:
                try:
                    self.poll.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass  # the TCP socket was not being read (held back)
            s.close()


def main(argv: list[str]) -> int:
    from service.threads import name_os_thread

    name_os_thread(argv[2])  # what top, ps and the benchmark's CPU by thread call it
    # systemd's SIGTERM reaches every process of the unit: the relay must outlive the
    # readers it serves, so it ignores it; the collector's stop ends its readers first and
    # then this relay, by closing the control socket (its own session keeps Ctrl-C away)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    relay = _Relay(socket.socket(fileno=int(argv[1])))
    relay.ctrl.send(b"r")
    relay.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
