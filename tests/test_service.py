"""Running as a service: sd_notify over a real unix datagram socket, the Prometheus
endpoint checked against the rows on disk, and `collector.py status`."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from service import status as state_file
from simulator import Simulator
from tests.helpers import ROOT, CollectorProcess, market_section, read_kind, wait_until, write_config

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
WS_KINDS = ("diff_orderbooks", "partial_orderbooks")


def scrape(port: int) -> dict:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_sd_notify_ready_watchdog_status_stopping(tmp_path, monkeypatch):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: a ping every 0.5 s
    messages = []

    def drain():
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                return

    with Simulator(spot=dict(symbols=SYMBOLS)) as sim:
        cfg = write_config(tmp_path, [market_section("spot", sim.spot, SYMBOLS)])
        proc = CollectorProcess(cfg)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (sum("WATCHDOG=1" in m for m in messages) < 3
                                                   or not any(m.startswith("STATUS=") for m in messages)):
                drain()
            rc = proc.stop()
        finally:
            proc.kill()
        drain()
    assert rc == 0, proc.log
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    assert "STATUS=spot: 2/2 connections" in messages[ready]
    watchdogs = [i for i, m in enumerate(messages) if m == "WATCHDOG=1"]
    assert len(watchdogs) >= 3 and watchdogs[0] > ready
    assert any(m.startswith("STATUS=spot:") and "msgs/s" in m for m in messages)
    assert "STOPPING=1" in messages[-1] or any("STOPPING=1" in m for m in messages[-3:])


def test_metrics_endpoint_matches_the_rows_on_disk(tmp_path):
    with Simulator(spot=dict(symbols=SYMBOLS, updates_per_s=40), futures=dict(symbols=SYMBOLS)) as sim:
        cfg = write_config(tmp_path, [market_section("spot", sim.spot, SYMBOLS, snapshot_interval=3),
                                      market_section("futures", sim.futures, SYMBOLS, snapshot_interval=3)])
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("metrics on http://127.0.0.1:")
            port = int(re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", proc.log).group(1))
            wait_until(lambda: read_kind(tmp_path / "data", "spot", "diff_orderbooks").num_rows > 50)
            for m in sim.markets():
                m.faults.paused = True
            paused_at = time.time()
            time.sleep(2.5)  # every frame received is now in part files
            metrics = scrape(port)
            # REST keeps serving while the streams are paused: snapshots taken from here on
            # may reach the disk after the scrape
            late = {m.market.name: sum(1 for t, _, st in list(m.rest_log) if st == 200 and t >= paused_at)
                    for m in sim.markets()}
            status = subprocess.run([sys.executable, str(ROOT / "collector.py"), "status", "--config", str(cfg)],
                                    capture_output=True, text=True, timeout=30)
            rc = proc.stop()
        finally:
            proc.kill()
    assert rc == 0
    data = tmp_path / "data"
    for market in ("spot", "futures"):
        for kind in ("diff_orderbooks", "partial_orderbooks", "orderbooks", "gaps"):
            on_disk = read_kind(data, market, kind).num_rows
            written = metrics[("obc_rows_written_total", (("kind", kind), ("market", market)))]
            if kind == "orderbooks":
                assert written <= on_disk <= written + late[market], (market, kind, late)
            else:
                assert written == on_disk, (market, kind)
        # every frame processed is a row or a copy dropped (two connections per batch)
        frames = sum(metrics[("obc_frames_total", (("kind", k), ("market", market)))] for k in WS_KINDS)
        rows = sum(read_kind(data, market, k).num_rows for k in WS_KINDS)
        copies = metrics[("obc_duplicates_total", (("market", market),))]
        assert frames == rows + copies and copies > 0, (frames, rows, copies)
        assert metrics[("obc_batch_connections", (("batch", f"ws-{market}-0"), ("market", market)))] == 2
        assert metrics[("obc_batches_degraded", (("market", market),))] == 0
        assert metrics[("obc_gaps_total", (("market", market), ("reason", "start")))] == len(SYMBOLS)
        assert metrics[("obc_snapshots_total", (("market", market), ("result", "ok")))] >= len(SYMBOLS)
        assert metrics[("obc_queue_depth", (("market", market),))] == 0
        assert metrics[("obc_rest_weight_cap", (("market", market),))] > 0
        assert metrics[("obc_snapshot_latency_seconds_count", (("market", market),))] >= len(SYMBOLS)
        assert ("obc_last_frame_age_seconds", (("connection", f"ws-{market}-0a"), ("market", market))) in metrics
        assert metrics[("obc_relay_fallback_connections", (("market", market),))] == 0
    assert metrics[("obc_relays_up", ())] == metrics[("obc_relays_configured", ())] == 2
    assert not [k for k in metrics if k[0] == "obc_restarts_total"]  # nothing died
    assert status.returncode == 0, status.stdout + status.stderr
    assert "stamp relays 2/2 up" in status.stdout
    assert "running" in status.stdout and "spot     streams 4/4" in status.stdout
    assert "gaps since start: start=2" in status.stdout and "upload: disabled" in status.stdout


def test_status_says_when_the_collector_is_not_running(tmp_path):
    text, running = state_file.render(tmp_path)
    assert not running and "has not run" in text
    state_file.write(tmp_path, {"pid": 1, "time": time.time() - 120, "markets": {}, "last_upload": None})
    text, running = state_file.render(tmp_path)
    assert not running and "NOT RUNNING (last seen 120s ago)" in text
