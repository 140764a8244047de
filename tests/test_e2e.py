"""End to end: the real collector subprocess against the simulator over real sockets.

Every diff, partial and snapshot the simulator delivered must be on disk exactly once,
with the right values and types, for both markets, and for a replay of real captures.
"""
from __future__ import annotations

import ssl
import time
from collections import Counter

import orjson
import pytest
import trustme

from simulator import Simulator
from simulator.server import load_capture
from storage.schemas import SCHEMAS
from tests.faults import distinct_frames
from tests.helpers import SHARED_DATA, CollectorProcess, market_section, read_kind, wait_until, write_config

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT"]


def floats(levels):
    return [float(p) for p, _ in levels], [float(q) for _, q in levels]


def us(t):
    """An exchange time as stored: µs (sent in ms by futures x 1000; spot asks for µs)."""
    return None if t is None else t * 1000 if t < 10**14 else t


def expected_depth_row(market: str, kind: str, stream: str, data: bytes) -> tuple:
    d = orjson.loads(data)
    if market == "spot" and kind == "partial_orderbooks":
        symbol = stream.split("@")[0].upper()
        row = (symbol, None, None, d["lastUpdateId"], None, None)
        bids, asks = d["bids"], d["asks"]
    else:
        row = (d["s"], us(d["E"]), d["U"], d["u"], d.get("pu"), us(d.get("T")))
        bids, asks = d["b"], d["a"]
    return row + tuple(map(tuple, floats(bids) + floats(asks)))


def actual_depth_rows(table) -> list[tuple]:
    cols = ["symbol", "event_time", "first_update_id", "final_update_id", "prev_final_update_id",
            "transaction_time", "bid_prices", "bid_sizes", "ask_prices", "ask_sizes"]
    return [tuple(tuple(v) if isinstance(v, list) else v for v in (r[c] for c in cols)) for r in table.to_pylist()]


def assert_schema(table, kind):
    assert table.schema.remove_metadata() == SCHEMAS[kind], kind


def assert_delivered_on_disk(sim_market, data_dir, started_us, ended_us):
    market = sim_market.market.name
    sent = {"diff_orderbooks": [], "partial_orderbooks": []}
    for s in distinct_frames(sim_market):
        kind = "partial_orderbooks" if sim_market.streams[s.stream].kind == "partial" else "diff_orderbooks"
        sent[kind].append(expected_depth_row(market, kind, s.stream, s.data))
    for kind, rows in sent.items():
        table = read_kind(data_dir, market, kind)
        assert_schema(table, kind)
        assert len(rows) > 20, (market, kind, len(rows))
        actual = actual_depth_rows(table)
        # exactly once: same multiset, no duplicates, nothing missing
        assert Counter(actual) == Counter(rows), (market, kind)
        times = table.column("received_time").to_pylist()
        assert all(started_us <= t <= ended_us for t in times)
    snaps = read_kind(data_dir, market, "orderbooks")
    assert_schema(snaps, "orderbooks")
    expected = Counter()
    for symbol, limit, body in sim_market.rest_sent:
        d = orjson.loads(body)
        expected[(symbol, limit, d["lastUpdateId"], us(d.get("E")), us(d.get("T")),
                  *map(tuple, floats(d["bids"]) + floats(d["asks"])))] += 1
    actual = Counter(
        (r["symbol"], r["limit"], r["lastUpdateId"], r["event_time"], r["transaction_time"],
         tuple(r["bid_prices"]), tuple(r["bid_sizes"]), tuple(r["ask_prices"]), tuple(r["ask_sizes"]))
        for r in snaps.to_pylist())
    assert sum(expected.values()) >= len(SYMBOLS)
    assert actual == expected
    for r in snaps.to_pylist():
        assert r["request_time"] <= r["received_time"]


@pytest.mark.parametrize("tls", [False, True], ids=["ws+http", "wss+https"])
def test_both_markets_every_message_on_disk_exactly_once(tmp_path, tls):
    spot = dict(symbols=SYMBOLS, record=True, updates_per_s=40)
    futures = dict(symbols=SYMBOLS, record=True, updates_per_s=40)
    env = {}
    if tls:  # the simulator with a certificate from a test CA, which the collector is told to trust
        ca = trustme.CA()
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server)
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        env = {"SSL_CERT_FILE": str(tmp_path / "ca.pem"), "REQUESTS_CA_BUNDLE": str(tmp_path / "ca.pem")}
        spot["ssl_context"] = futures["ssl_context"] = server
    with Simulator(spot=spot, futures=futures) as sim:
        cfg = write_config(tmp_path, [
            market_section("spot", sim.spot, SYMBOLS, snapshot_interval=2, snapshot_limit=100,
                           symbols_per_connection=2, partial_levels=5),
            market_section("futures", sim.futures, SYMBOLS, snapshot_interval=2, snapshot_limit=50,
                           symbols_per_connection=2, partial_speed="250ms", diff_speed="100ms"),
        ])
        started = time.time_ns() // 1000
        proc = CollectorProcess(cfg, env=env)
        try:
            proc.wait_for_log("recording market=futures")
            wait_until(lambda: sum(m.frames_sent for m in sim.markets()) > 400, timeout=30)
            for m in sim.markets():
                m.faults.paused = True
            time.sleep(1.5)  # frames in flight arrive; the collector has nothing more to read
            rc = proc.stop()
        finally:
            proc.kill()
        ended = time.time_ns() // 1000
    assert rc == 0, proc.log
    assert "stopped cleanly" in proc.log
    assert "Traceback" not in proc.log
    # a clean stop leaves no journal behind: every segment became part files
    assert not list((tmp_path / "data" / ".journal").rglob("seg-*"))
    for m in sim.markets():
        assert_delivered_on_disk(m, tmp_path / "data", started, ended)
        # two batches per market (2 symbols per connection), each read by two connections
        assert m.connections_opened == 4
        gaps = read_kind(tmp_path / "data", m.market.name, "gaps")
        assert_schema(gaps, "gaps")
        # one "start" row per symbol, nothing else: the streams were unbroken
        assert sorted(gaps.column("reason").to_pylist()) == ["start"] * len(SYMBOLS)


@pytest.mark.parametrize("market", ["spot", "futures", "delivery"])
def test_replay_of_real_captures(tmp_path, market):
    """Real traffic of each market (COIN-M: `delivery`) through the simulator: every captured
    depth frame recorded exactly, the snapshots as sent."""
    capture = load_capture(SHARED_DATA, market)
    sim_kw = dict(capture=capture, record=True, replay_speed=8.0)
    depth_frames = [f for f in capture.frames if "@depth" in f[1]]
    with Simulator(**{market: sim_kw}) as sim:
        m = sim.markets()[0]
        cfg = write_config(tmp_path, [market_section(market, m, capture.symbols, snapshot_interval=60,
                                                     snapshot_limit=1000, diff_speed="100ms")])
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log(f"recording market={market}")
            # every captured frame went out (on each of the batch's connections)
            wait_until(lambda: len(distinct_frames(m)) >= len(depth_frames), timeout=60, interval=0.5)
            time.sleep(1.0)
            rc = proc.stop()
        finally:
            proc.kill()
    assert rc == 0, proc.log
    data_dir = tmp_path / "data"
    diffs = read_kind(data_dir, market, "diff_orderbooks")
    expected = Counter(expected_depth_row(market, "diff_orderbooks", name, data) for _, name, data in depth_frames)
    assert Counter(actual_depth_rows(diffs)) == expected
    # the real id chains are unbroken: only the start of each symbol's stream is a gap
    gaps = read_kind(data_dir, market, "gaps")
    assert set(gaps.column("reason").to_pylist()) == {"start"}
    snaps = read_kind(data_dir, market, "orderbooks").to_pylist()
    assert {r["symbol"] for r in snaps} == set(capture.symbols)
    for r in snaps:
        body = orjson.loads(capture.snapshots[r["symbol"]])
        assert r["lastUpdateId"] == body["lastUpdateId"]
        assert r["bid_prices"] == [float(p) for p, _ in body["bids"]]
        assert r["ask_sizes"] == [float(q) for _, q in body["asks"]]
    if market == "spot":
        # The NKNUSDT snapshot joins its diff stream as Binance's procedure says:
        # the first diff with u > lastUpdateId has U <= lastUpdateId + 1.
        last = next(r["lastUpdateId"] for r in snaps if r["symbol"] == "NKNUSDT")
        nkn = sorted((r for r in diffs.to_pylist() if r["symbol"] == "NKNUSDT"), key=lambda r: r["final_update_id"])
        first = next(r for r in nkn if r["final_update_id"] > last)
        assert first["first_update_id"] <= last + 1 <= first["final_update_id"]


@pytest.mark.parametrize("market", ["futures", "delivery"])
def test_every_event_futures_streams_are_recorded_exactly(tmp_path, market):
    """`diff_speed = 0ms`: `<symbol>@depth@0ms`, every book update its own frame as it
    happens (USD-M and COIN-M), each recorded once with every column as sent, the `pu`
    chain unbroken."""
    symbols = ["BTCUSD_PERP", "ETHUSD_PERP"] if market == "delivery" else SYMBOLS
    kw = dict(symbols=symbols, record=True, updates_per_s=200)
    with Simulator(**{market: kw}) as sim:
        m = sim.markets()[0]
        cfg = write_config(tmp_path, [market_section(market, m, symbols, snapshot_interval=5, snapshot_limit=50,
                                                     diff_speed="0ms")])
        started = time.time_ns() // 1000
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log(f"recording market={market}")
            wait_until(lambda: len(m.emitted) > 1500, timeout=30)
            m.faults.paused = True
            time.sleep(1.5)
            rc = proc.stop()
        finally:
            proc.kill()
        ended = time.time_ns() // 1000
    assert rc == 0, proc.log
    assert {s.name for s in m.streams.values() if s.kind == "diff"} == {f"{s.lower()}@depth@0ms" for s in symbols}
    assert_delivered_on_disk(m, tmp_path / "data", started, ended)
    diffs = read_kind(tmp_path / "data", market, "diff_orderbooks").to_pylist()
    # each frame is one update: as many diff rows as the book moved while subscribed
    subscribed = {(s, U, u) for s, U, u, _ in m.emitted}
    assert {(r["symbol"], r["first_update_id"], r["final_update_id"]) for r in diffs} == subscribed
    assert all(r["first_update_id"] == r["final_update_id"] for r in diffs)
    gaps = read_kind(tmp_path / "data", market, "gaps")
    assert sorted(gaps.column("reason").to_pylist()) == ["start"] * len(symbols)
