"""Sockets that know when their bytes arrived: the kernel's receive time of each read.

A Python thread stamps a frame only once it holds the GIL again after its read, so a
busy process stamps late: at 10,000 msgs/s the stamp trailed the arrival by 24 ms at
p99 (BENCHMARKS.md). Linux records when each TCP segment reached the host; with
`SO_TIMESTAMPNS` set, `recvmsg()` returns that time (CLOCK_REALTIME, the same clock as
`time.time_ns()`) of the newest segment it read. `StampedSocket.stamp_us` keeps it, and
a frame gets the stamp of the read that completed it: the time its last byte arrived,
whatever the interpreter was doing then.

The reads themselves are the stamp relay's (`handlers.ingest.relay`), a process that reads the
socket as soon as bytes arrive: a read made late by a reader waiting for the GIL would
give the bytes that waited the stamp of the newest ones. `StampedSocket` then reads the
relay's records, each with the stamp of the relay's read, and writes to the socket
itself; without a relay it reads the socket.

`ssl.SSLSocket` cannot `recvmsg()`, so TLS runs over memory BIOs (`ssl.SSLObject`):
ciphertext is read here with its stamp, OpenSSL decrypts it. Certificates and host
names are verified exactly as `ssl.create_default_context()` does, with certifi's CAs.

websocket-client takes the socket as it is (`create_connection(url, socket=...)`) and
calls only what is below: `recv`, `send`, `settimeout`/`gettimeout`, `shutdown`,
`close`, `fileno`. Where the kernel gives no stamp (not Linux), `stamp_us` is the
clock read right after the read, as before.
"""
from __future__ import annotations

import functools
import os
import socket
import ssl
import sys
from typing import Any
from urllib.parse import urlsplit

import certifi
from websocket._url import get_proxy_info

from handlers.ingest.relay import RelayedReads, StampRelay
from handlers.ingest.timestamps import ANC_SPACE, SO_TIMESTAMPNS, stamp_of, wall_us


def tls_context() -> ssl.SSLContext:
    """Verified TLS: certificate chain and host name, against certifi's CA bundle, or the
    bundle named by SSL_CERT_FILE (OpenSSL's variable; e.g. a company's TLS proxy).

    One context serves every connection (a context is safe to share between threads):
    loading the bundle costs about 0.9 MiB and 25 ms of CPU a context, which a context per
    connection paid at every connect and held for every live connection."""
    return _verified_context(os.environ.get("SSL_CERT_FILE") or certifi.where())


@functools.lru_cache(maxsize=4)
def _verified_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


class StampedSocket:
    """A connected TCP socket (optionally TLS) whose `stamp_us` is the kernel's receive
    time, in µs, of the newest bytes the last read returned.

    A write that finds the connection gone (EPIPE, ECONNRESET: the peer closed or reset
    it) does not raise: what the peer sent before it went is still to be read, and its
    reads end the connection (end of stream, or the reset). Otherwise a pong to a ping that
    came just before the close would end the reader with data frames still unread behind
    the ping (frames delivered but lost). `write_lost` says why the writes stopped."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 relay: StampRelay | None = None):
        self.sock = sock
        self.stamp_us = 0
        self.kernel = False
        self.relayed: RelayedReads | None = None
        self.write_lost: str | None = None
        if sys.platform.startswith("linux") and ANC_SPACE:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self.kernel = True
            except OSError:
                pass
        if self.kernel and relay is not None:
            pipe = relay.adopt(sock)
            if pipe is not None:
                pipe.settimeout(sock.gettimeout())
                self.relayed = RelayedReads(pipe)
        self.tls = None
        if context is not None:
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
            try:
                self._handshake()
            except BaseException:
                if self.relayed is not None:
                    self.relayed.pipe.close()  # the caller closes the TCP socket
                raise

    # -- the raw reads ------------------------------------------------------------------

    def _read_raw(self, n: int) -> bytes:
        if self.relayed is not None:
            data, self.stamp_us = self.relayed.read(n)
            return data
        if not self.kernel:
            data = self.sock.recv(n)
            self.stamp_us = wall_us()
            return data
        data, anc, _, _ = self.sock.recvmsg(n, ANC_SPACE)
        self.stamp_us = stamp_of(anc)
        return data

    def _write(self, data: bytes | memoryview) -> int:
        """The one place bytes go out (see the class: a connection gone is left to the reads)."""
        if self.write_lost is not None:
            return len(data)
        try:
            return self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            self.write_lost = f"{type(e).__name__}: {e}"
            return len(data)

    def _flush_tls(self) -> None:
        out = self._out.read()
        view = memoryview(out)
        while view:
            view = view[self._write(view):]

    def _handshake(self) -> None:
        tls = self.tls
        assert tls is not None
        while True:
            try:
                tls.do_handshake()
                self._flush_tls()
                return
            except ssl.SSLWantReadError:
                self._flush_tls()
                data = self._read_raw(1 << 16)
                if not data:
                    raise ConnectionResetError("connection closed during the TLS handshake") from None
                self._in.write(data)

    # -- what websocket-client calls ----------------------------------------------------

    def recv(self, n: int) -> bytes:
        if self.tls is None:
            return self._read_raw(n)
        while True:
            try:
                data = self.tls.read(n)
            except ssl.SSLWantReadError:
                data = None
            except ssl.SSLZeroReturnError:
                return b""  # the peer ended TLS cleanly
            if self._out.pending:
                self._flush_tls()  # e.g. a TLS 1.3 key update answer
            if data is not None:
                return data
            raw = self._read_raw(max(n, 1 << 16))
            if not raw:
                return b""
            self._in.write(raw)

    def send(self, data: bytes | memoryview) -> int:
        if self.tls is None:
            return self._write(data)
        n = self.tls.write(data)
        self._flush_tls()
        return n

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.send(view):]

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)
        if self.relayed is not None:
            self.relayed.pipe.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    def fileno(self) -> int:
        return self.sock.fileno()

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()
        if self.relayed is not None:
            self.relayed.pipe.close()  # the relay then lets go of the connection too

    @property
    def _closed(self) -> bool:
        return self.sock._closed  # type: ignore[attr-defined]  # what websocket-client reads


def via_proxy(url: str) -> bool:
    """True when websocket-client would go through a proxy for this URL (`http_proxy` /
    `https_proxy` and `no_proxy` in the environment, its own rules). Such a connection is
    left to websocket-client, and its frames are stamped with the clock after each read."""
    parts = urlsplit(url)
    return get_proxy_info(parts.hostname or "", parts.scheme == "wss")[0] is not None


def connect(url: str, timeout: float, context: ssl.SSLContext | None = None,
            relay: StampRelay | None = None) -> StampedSocket:
    """Open the TCP connection (and TLS for wss://) of a WebSocket URL, stamped; its reads
    done by `relay` when one is given and running."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    sock = socket.create_connection((parts.hostname, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not secure:
            return StampedSocket(sock, relay=relay)
        return StampedSocket(sock, context or tls_context(), server_hostname=parts.hostname, relay=relay)
    except BaseException:
        sock.close()
        raise
