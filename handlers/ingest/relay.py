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
        reads ◄── unix socketpair ◄── [stamp, n, bytes] records (up to 4 MiB held a connection)
        writes ──► the TCP socket itself (pongs, SUBSCRIBE)

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

from handlers.ingest.timestamps import ANC_SPACE, stamp_of, wall_us
from service.helpers import spawn

log = logging.getLogger(__name__)

RECORD = struct.Struct("<qI")
READ_SIZE = 1 << 16
HOLD_LIMIT = 4 << 20  # bytes held for a collector end that is not reading, before TCP is left to wait
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
    and the relay's end of the pair."""

    def __init__(self, tcp: socket.socket, pipe: socket.socket):
        self.tcp, self.pipe = tcp, pipe
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.reading = True
        self.ended = False  # the end record is queued


class _Relay:
    """The relay's loop: epoll over the control socket, every connection's TCP socket (to
    read) and its end of the pair (to notice the collector closing it; to write when a
    record did not fit)."""

    def __init__(self, ctrl: socket.socket):
        self.ctrl = ctrl
        self.poll = select.epoll()
        self.poll.register(ctrl.fileno(), select.EPOLLIN)
        self.by_fd: dict[int, tuple[_Conn, bool]] = {}  # fd -> (connection, is its TCP socket)

    def run(self) -> None:
        ctrl, by_fd, read = self.ctrl.fileno(), self.by_fd, self._read
        while True:
            for fd, events in self.poll.poll():
                if fd == ctrl:
                    if not self._accept():
                        return
                    continue
                entry = by_fd.get(fd)
                if entry is None:
                    continue  # dropped by an earlier event of this round
                conn, tcp = entry
                if tcp:
                    read(conn)
                elif events & select.EPOLLIN and not self._collector_open(conn):
                    self._drop(conn)
                elif events & select.EPOLLOUT:
                    self._flush(conn)

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
        if not data:
            self._end(conn, 0)
            return
        header = RECORD.pack(stamp_of(anc), len(data))
        if conn.held:
            self._hold(conn, header + data)
            return
        try:  # the common case: header and bytes straight into the pair, not copied here
            n = conn.pipe.sendmsg((header, data))
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop(conn)
            return
        if n < len(header) + len(data):
            self._hold(conn, (header + data)[n:])

    def _end(self, conn: _Conn, code: int) -> None:
        if conn.reading:
            self.poll.unregister(conn.tcp.fileno())
            conn.reading = False
        conn.ended = True
        self._send(conn, RECORD.pack(code, 0))

    def _send(self, conn: _Conn, record: bytes) -> None:
        if conn.held:
            self._hold(conn, record)
            return
        try:
            n = conn.pipe.send(record)
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop(conn)
            return
        if n < len(record):
            self._hold(conn, record[n:])
        elif conn.ended:
            self._drop(conn)

    def _hold(self, conn: _Conn, rest: bytes) -> None:
        """Bytes the pair would not take now: kept, in order, until it drains."""
        if not conn.held:
            self.poll.modify(conn.pipe.fileno(), select.EPOLLIN | select.EPOLLOUT)
        conn.held.append(rest)
        conn.held_bytes += len(rest)
        if conn.held_bytes > HOLD_LIMIT and conn.reading:
            self.poll.unregister(conn.tcp.fileno())  # TCP back-pressure until the collector reads again
            conn.reading = False

    def _flush(self, conn: _Conn) -> None:
        data = b"".join(conn.held)
        try:
            n = conn.pipe.send(data)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn)
            return
        rest = data[n:]
        conn.held = [rest] if rest else []
        conn.held_bytes = len(rest)
        if rest:
            return
        self.poll.modify(conn.pipe.fileno(), select.EPOLLIN)
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
