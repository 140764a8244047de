"""received_time is the kernel's arrival time of the bytes (handlers/stamped.py), over
plain TCP and over verified TLS, and the collector records wss:// + https:// end to end."""
from __future__ import annotations

import queue
import socket
import ssl
import struct
import sys
import threading
import time

import pytest
import trustme

from handlers import stamped
from handlers.websocket import ConnectionStats, Reader, combined_url
from simulator import Simulator
from storage.journal import WS
from tests.helpers import CollectorProcess, market_section, wait_until, write_config
from tests.test_e2e import SYMBOLS, assert_delivered_on_disk


def test_stamp_is_when_the_bytes_arrived_not_when_they_were_read():
    srv = socket.create_server(("127.0.0.1", 0))
    sent_us = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            for _ in range(3):
                sent_us.append(time.time_ns() // 1000)
                conn.sendall(b"x" * 100)
                time.sleep(0.05)
            conn.recv(1)  # until the client closes

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    sock = stamped.connect(f"ws://127.0.0.1:{srv.getsockname()[1]}/", timeout=5)
    try:
        if sys.platform.startswith("linux"):
            assert sock.kernel
        for i in range(3):
            wait_until(lambda i=i: len(sent_us) > i, timeout=5)
            time.sleep(0.03)  # the reader is late: the bytes have been waiting
            before_read = time.time_ns() // 1000
            assert sock.recv(100) == b"x" * 100
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
        inbox: queue.Queue = queue.Queue()
        reader = Reader("ws-spot-0", url, inbox, 5.0, stamped.wall_us, ConnectionStats())
        reader.start()
        try:
            items = [inbox.get(timeout=10) for _ in range(5)]
        finally:
            reader.close()
            reader.join(5)
        now = time.time_ns() // 1000
        for kind, received, _conn, raw in items:
            assert kind == WS and raw.startswith(b'{"stream":"btcusdt@depth@100ms"')
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


def test_collector_records_over_wss_and_https(ca, ca_file, tmp_path):
    tls = server_context(ca, "127.0.0.1")
    spot = dict(symbols=SYMBOLS, record=True, updates_per_s=40, ssl_context=tls)
    futures = dict(symbols=SYMBOLS, record=True, updates_per_s=40, ssl_context=tls)
    with Simulator(spot=spot, futures=futures) as sim:
        cfg = write_config(tmp_path, [
            market_section("spot", sim.spot, SYMBOLS, snapshot_interval=2, snapshot_limit=100,
                           symbols_per_connection=2, partial_levels=5),
            market_section("futures", sim.futures, SYMBOLS, snapshot_interval=2, snapshot_limit=50,
                           symbols_per_connection=2),
        ])
        started = time.time_ns() // 1000
        proc = CollectorProcess(cfg, env={"SSL_CERT_FILE": str(ca_file), "REQUESTS_CA_BUNDLE": str(ca_file)})
        try:
            proc.wait_for_log("recording market=futures")
            wait_until(lambda: sum(m.frames_sent for m in sim.markets()) > 300, timeout=30)
            for m in sim.markets():
                m.faults.paused = True
            time.sleep(1.5)
            rc = proc.stop()
        finally:
            proc.kill()
        ended = time.time_ns() // 1000
    assert rc == 0, proc.log
    assert "Traceback" not in proc.log
    for m in sim.markets():
        assert m.connections_opened == 2
        assert_delivered_on_disk(m, tmp_path / "data", started, ended)


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
