"""received_time is the kernel's arrival time of the bytes (handlers/stamped.py), over
plain TCP and over verified TLS (the collector over wss:// + https:// end to end is in
test_e2e.py)."""
from __future__ import annotations

import socket
import ssl
import struct
import sys
import threading
import time

import pytest
import trustme

from handlers.ingest import stamped
from handlers.ingest.inbox import WS, Inbox
from handlers.ingest.websocket import ConnectionStats, Reader, combined_url
from simulator import Simulator


def test_stamp_is_when_the_bytes_arrived_not_when_they_were_read():
    """In lockstep: the server sends one message, the client reads it 30 ms later, and only
    then is the next one sent (so no later segment can merge into the one being read)."""
    srv = socket.create_server(("127.0.0.1", 0))
    sent_us: list[int] = []
    sent, read = threading.Event(), threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            for _ in range(3):
                sent_us.append(time.time_ns() // 1000)
                conn.sendall(b"x" * 100)  # on loopback the bytes are in the client's socket now
                sent.set()
                read.wait(5)
                read.clear()
            conn.recv(1)  # until the client closes

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    sock = stamped.connect(f"ws://127.0.0.1:{srv.getsockname()[1]}/", timeout=5)
    try:
        if sys.platform.startswith("linux"):
            assert sock.kernel
        for i in range(3):
            assert sent.wait(5)
            sent.clear()
            time.sleep(0.03)  # the reader is late: the bytes have been waiting
            before_read = time.time_ns() // 1000
            assert sock.recv(100) == b"x" * 100
            read.set()
            assert sent_us[i] <= sock.stamp_us <= before_read
            if sock.kernel:
                assert before_read - sock.stamp_us >= 25_000  # the arrival, not the read
    finally:
        sock.close()
        srv.close()
        t.join(5)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def server_context(ca, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


@pytest.fixture
def ca_file(ca, tmp_path, monkeypatch):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    return path


def test_tls_frames_are_stamped_and_certificates_verified(ca, ca_file, monkeypatch):
    with Simulator(spot=dict(symbols=["BTCUSDT"], ssl_context=server_context(ca, "127.0.0.1"))) as sim:
        assert sim.spot.ws_url.startswith("wss://")
        url = combined_url(sim.spot.ws_url, ["btcusdt@depth@100ms"])
        inbox = Inbox()
        reader = Reader("ws-spot-0", url, inbox, 5.0, stamped.wall_us, ConnectionStats())
        reader.start()
        try:
            items = [inbox.get(timeout=10) for _ in range(5)]
        finally:
            reader.close()
            reader.join(5)
        now = time.time_ns() // 1000
        for kind, received, _conn, frames in items:
            assert kind == WS and frames and all(f.startswith(b'{"stream":"btcusdt@depth@100ms"') for f in frames)
            assert now - 60_000_000 < received <= now
        assert [i[1] for i in items] == sorted(i[1] for i in items)

        # without the CA the certificate is refused: TLS is always verified
        monkeypatch.delenv("SSL_CERT_FILE")
        with pytest.raises(ssl.SSLCertVerificationError):
            stamped.connect(url, timeout=5)


def test_tls_host_name_is_checked(ca, ca_file):
    with Simulator(spot=dict(symbols=["BTCUSDT"], ssl_context=server_context(ca, "stream.example.org"))) as sim:
        with pytest.raises(ssl.SSLCertVerificationError, match="(?i)mismatch|doesn't match|not valid"):
            stamped.connect(sim.spot.ws_url + "/stream?streams=btcusdt@depth", timeout=5)


def test_a_closed_tls_peer_reads_as_end_of_stream(ca, ca_file):
    srv_ctx = server_context(ca, "127.0.0.1")
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        with srv_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(struct.pack("<q", 7))
            try:
                tls.unwrap()  # close_notify; the client then just closes
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    sock = stamped.connect(f"wss://127.0.0.1:{srv.getsockname()[1]}/", timeout=5)
    try:
        assert sock.recv(8) == struct.pack("<q", 7)
        assert sock.recv(8) == b""
    finally:
        sock.close()
        srv.close()
        t.join(5)


def test_a_proxied_connection_is_left_to_websocket_client(monkeypatch):
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert not stamped.via_proxy("wss://stream.binance.com:9443/stream?streams=btcusdt@depth")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:3128")
    assert stamped.via_proxy("wss://stream.binance.com:9443/stream?streams=btcusdt@depth")
    assert not stamped.via_proxy("ws://127.0.0.1:8080/stream")  # plain ws:// reads http_proxy
    monkeypatch.setenv("no_proxy", "stream.binance.com")
    assert not stamped.via_proxy("wss://stream.binance.com:9443/stream?streams=btcusdt@depth")


def test_every_connection_shares_one_verified_context_per_ca_bundle(ca_file, tmp_path, monkeypatch):
    """Loading a CA bundle costs ~1 MiB and ~25 ms a context: connections share one."""
    first = stamped.tls_context()
    assert stamped.tls_context() is first
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    other = tmp_path / "other.pem"
    other.write_bytes(ca_file.read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    assert stamped.tls_context() is not first  # another bundle, its own context
