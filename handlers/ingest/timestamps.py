"""The kernel's receive time of a socket read (`SO_TIMESTAMPNS`), taken the same way by the
stamp relay (handlers.ingest.relay_process) and by a reader that reads its own socket (handlers.ingest.stamped).

With the option set on a TCP socket, `recvmsg()` returns, as ancillary data, the time
(CLOCK_REALTIME, the clock of `time.time_ns()`) at which the newest bytes it read reached
the host."""
from __future__ import annotations

import socket
import struct
import time

# <asm-generic/socket.h>: SO_TIMESTAMPNS_OLD == SCM_TIMESTAMPNS on the usual 64-bit
# Linux ports (x86_64, arm64, riscv64, ...); Python does not export the name.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@qq")
ANC_SPACE = socket.CMSG_SPACE(TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0  # recvmsg's room for it


def wall_us() -> int:
    """The local clock in µs since the epoch (the collector's clock)."""
    return time.time_ns() // 1000


def stamp_of(anc: list[tuple[int, int, bytes]]) -> int:
    """The kernel's receive time, in µs, in a `recvmsg()`'s ancillary data; the clock now
    when the read brought none (e.g. only a FIN)."""
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= TIMESPEC.size:
            sec, ns = TIMESPEC.unpack_from(payload)
            return sec * 1_000_000 + ns // 1000
    return wall_us()
