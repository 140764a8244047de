"""The stamp relay's process (`python -m handlers.ingest.relay_process`): one thread that
reads every relayed connection's TCP socket the moment bytes arrive and forwards each read,
with its kernel receive time, to the collector (`handlers.ingest.relay` is the collector's
side, and says why).

A record is `<q stamp_us><I n>` then n bytes; n == 0 ends the stream: stamp 0 for the
peer's close, or minus the errno of a failed read.

This is the relay's plain version: where scripts/build-relay.sh built it, the collector
runs the same loop compiled (`handlers/ingest/stamp_relay.c`), which every test of
tests/test_relay.py and a side-by-side test in tests/test_fastpath.py hold to this one.
A rule changed here is changed there.

This module imports only what the loop needs (no logging, threading or subprocess): two
relays run beside every collector, and each interpreter's imports are resident memory
(a relay is about 11 MiB, 15 with the collector-side imports; BENCHMARKS.md, "Per read").
"""
from __future__ import annotations

import errno
import select
import signal
import socket
import struct
import sys
import time

from handlers.ingest.timestamps import ANC_SPACE, TIMESPEC, stamp_of

RECORD = struct.Struct("<qI")
READ_SIZE = 1 << 16
HOLD_LIMIT = 4 << 20  # bytes held for a collector end that is not reading, before TCP is left to wait
# s: records go on at the multiples of this of the host's monotonic clock (never their stamps
# wait). Crash safety's 1 s holds it: 0.25 here, then up to 0.2 for the processor's next
# look and 0.2 for the journal's push (BENCHMARKS.md, "Per read, third round")
FORWARD_AFTER = 0.25
FORWARD_BYTES = 1 << 16  # ... unless this much waits
# ... or the connection is new: its first reads are the TLS and WebSocket handshakes, each
# of which the collector answers before the next can come (a wait for each would add up to
# FORWARD_AFTER a round trip to every connect)
EAGER_READS = 8
_IOV_MAX = 1024  # pieces a sendmsg takes (Linux's UIO_MAXIOV)


def next_forward(now: float, every: float = FORWARD_AFTER) -> float:
    """The next moment (monotonic s) at which every relay sends its waiting records on."""
    return (now // every + 1) * every


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
        self.eager = EAGER_READS  # reads still forwarded at once (the handshakes)


class _Relay:
    """The relay's loop: epoll over the control socket, every connection's TCP socket (to
    read) and its end of the pair (to notice the collector closing it; to write when the
    pair was full).

    Reads are made the moment bytes arrive (that is what keeps stamps exact); forwarding
    them is not urgent, since each record carries its stamp. So the records waiting are
    sent on together at the next multiple of FORWARD_AFTER of the monotonic clock (sooner
    once FORWARD_BYTES of a connection wait, or it ended): the reader in the collector then
    wakes once for several reads rather than once a read (BENCHMARKS.md, "Per read").

    The multiples are the host's (CLOCK_MONOTONIC), so every relay forwards at the same
    moments: a frame's copies that arrived before a given moment reach the collector's
    processor together, which keeps the copy stamped first (`in_arrival_order`). With a
    timer from each relay's own first record, the copy that arrived first could be
    forwarded later, and a later copy's stamp kept, by up to FORWARD_AFTER.

    Two exceptions: a connection's first EAGER_READS reads go on at once (its handshakes),
    and so does everything of a connection whose TCP socket reads its end, which the
    collector brings about (`shutdown(SHUT_RD)`) when it closes a connection that still
    delivers: nothing the relay holds is lost with it (`Reader._drain`)."""

    def __init__(self, ctrl: socket.socket, forward_after: float = FORWARD_AFTER):
        self.ctrl, self.forward_after = ctrl, forward_after
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
                except (BlockingIOError, InterruptedError):
                    continue  # not ready after all
                except OSError as e:  # this error, not the end of stream a second read would see
                    self._end(conn, -(e.errno or errno.EIO))
                    continue
                if not data or not anc:
                    self._read_done(conn, data, anc)
                    continue
                sec, ns = timespec(anc[0][2])
                conn.out += (pack(sec * 1_000_000 + ns // 1000, len(data)), data)
                conn.out_bytes += RECORD.size + len(data)
                if conn.out_bytes >= FORWARD_BYTES or conn.eager:
                    if conn.eager:
                        conn.eager -= 1
                    self._forward(conn)
                elif conn not in waiting:
                    if not waiting:
                        self.due = next_forward(monotonic(), self.forward_after)
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
                self.due = next_forward(time.monotonic(), self.forward_after)
            self.waiting[conn] = None
        conn.out.append(header)
        eager = False
        if data:
            conn.out.append(data)
            eager = conn.eager > 0
            conn.eager -= eager
        conn.out_bytes += len(header) + len(data)
        if conn.ended or eager or conn.out_bytes >= FORWARD_BYTES:
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
    try:  # its name in top and ps, and for the benchmark's CPU by thread (Linux keeps 15 bytes);
        # service.threads.name_os_thread does this for threads, at the cost of ctypes and logging
        with open("/proc/self/comm", "w") as comm:
            comm.write(argv[2][:15])
    except OSError:
        pass  # a name is a convenience, never a failure
    # systemd's SIGTERM reaches every process of the unit: the relay must outlive the
    # readers it serves, so it ignores it; the collector's stop ends its readers first and
    # then this relay, by closing the control socket (its own session keeps Ctrl-C away)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # argv: the control socket's fd, the process's name, its FORWARD_AFTER (StampRelay passes
    # the constant; tests hold records as long as they need)
    relay = _Relay(socket.socket(fileno=int(argv[1])), float(argv[3]))
    relay.ctrl.send(b"r")
    relay.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
