"""The stamp relay, the collector's side of it: a small process (its loop is
`handlers.ingest.relay_process`) reads every WebSocket connection's TCP socket the moment
bytes arrive, and hands them on, each read with its kernel receive time.

Why a process. A read's stamp is the kernel's arrival time of the newest bytes it returns
(`handlers.ingest.stamped`), so frames that wait in the socket for their reader take the stamp of
whatever arrived after them. A reader thread of the collector waits for the GIL behind the
processor, the writers and the other readers; at 40,000 msgs/s that wait made stamps 4-6
ms late at p99, 36 ms at worst (BENCHMARKS.md, Stamp relay). The relay is one thread in
its own interpreter, whose only work is to read and forward, so nothing but the operating
system's scheduler stands between an arrival and its read.

    collector process                                 relay process (handlers.ingest.relay_process)
    reader thread: connect TCP ── send_fds ─────────► registers the socket (epoll)
      websocket-client / TLS                            TCP readable: recvmsg(), kernel stamp
        reads ◄── unix socketpair ◄── [stamp, n, bytes] records, sent on together (up to 4 MiB held a connection)
        writes ──► the TCP socket itself (pongs, SUBSCRIBE)

A read is made the moment its bytes arrive, but its record need not travel at once: it
carries its own stamp. So the records go on together every 250 ms, at the same moments
from every relay (or once 64 KiB of a connection wait): where every read brings one frame
(every-event streams, quiet symbols) the reader thread wakes once for several reads
instead of once a read, which took three quarters of its CPU (BENCHMARKS.md, "Per read"). Delivery, not the stamps, is what
waits; liveness is judged in seconds.

The collector keeps the TCP socket for everything but reads: TLS, the WebSocket handshake,
pongs and SUBSCRIBE go out as before, and TLS decrypts what the records bring (their
format: `handlers.ingest.relay_process`). A collector that closes its end of the pair ends the
relay's copy of the TCP socket too; the relay exits when its control socket closes (the
collector stopped or died).

The relay's loop runs compiled where it was built (`handlers/ingest/stamp_relay.c`, by
scripts/build-relay.sh into the virtual environment's bin/, beside its python): the same
protocol and rules at about a third of the CPU a wake-up and a sixth of the memory (about 2 MiB resident against 11).
Without it, the Python loop runs (`relay_process`), and the start's log line says which.

Where the relay cannot run (not Linux, no kernel stamps), or while it is down, connections
are read by their reader thread as before (`StampedSocket` without a relay).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from handlers.ingest.relay_process import FORWARD_AFTER, RECORD
from handlers.ingest.timestamps import wall_us
from service.helpers import spawn, spawn_program

log = logging.getLogger(__name__)

_PIPE_READ = 1 << 18
READY_WAIT = 30.0  # s for a new relay to say it is ready (an interpreter's start on a loaded box)
LOOPS = ("auto", "compiled", "python")


def compiled_loop() -> Path | None:
    """The relay's compiled loop, if it was built for this environment (beside its python)."""
    path = Path(sys.executable).parent / "obc-stamp-relay"
    return path if os.access(path, os.X_OK) else None


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
    process's name for ps and top (15 bytes). `loop`: "auto" runs the compiled loop when it
    was built and the Python one otherwise; "compiled" and "python" ask for one (tests)."""

    def __init__(self, name: str = "stamp-relay", forward_after: float = FORWARD_AFTER, loop: str = "auto") -> None:
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, not {loop!r}")
        self.name, self.forward_after, self.loop = name, forward_after, loop
        self.restarts = 0  # starts after the first (the supervisor counts them)
        self._lock = threading.Lock()  # adopt() against start() and close(): held for a send, never a start
        self._proc: subprocess.Popen | None = None
        self._ctrl: socket.socket | None = None

    def start(self) -> bool:
        """Start the relay process and wait for its ready byte (at most READY_WAIT)."""
        program = compiled_loop() if self.loop != "python" else None
        if program is None and self.loop == "compiled":
            log.error("%s not started: its compiled loop was not built (scripts/build-relay.sh)", self.name)
            return False
        ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # a message per connection
        args = [str(theirs.fileno()), self.name, repr(self.forward_after)]
        try:
            if program is not None:
                proc = spawn_program([str(program), *args], pass_fds=[theirs.fileno()])
            else:
                proc = spawn("handlers.ingest.relay_process", args, pass_fds=[theirs.fileno()])
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
        loop = "compiled" if program is not None else "python"
        if program is None and self.loop == "auto":
            loop += " (no compiled loop built: scripts/build-relay.sh)"
        log.info("%s started pid=%d loop=%s", self.name, proc.pid, loop)
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


