"""verify and the data API, on data recorded from the simulator (clean, with injected gaps,
with tampered files) and from a replay of the real captures."""
from __future__ import annotations

import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simulator import Simulator
from simulator.server import load_capture
from storage.files import write_table_atomic
from tests.helpers import SHARED_DATA, CollectorProcess, market_section, read_kind, wait_until, write_config
from tools import verify
from tools.data import book_at, books, load

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Both markets for ~8 s, snapshots every 2 s, and 2 diffs dropped per market (real gaps)."""
    tmp = tmp_path_factory.mktemp("rec")
    with Simulator(spot=dict(symbols=SYMBOLS, updates_per_s=40), futures=dict(symbols=SYMBOLS, updates_per_s=40)) as sim:
        cfg = write_config(tmp, [market_section("spot", sim.spot, SYMBOLS, snapshot_interval=2, snapshot_limit=1000),
                                 market_section("futures", sim.futures, SYMBOLS, snapshot_interval=2)])
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("recording market=futures")
            wait_until(lambda: all(m.frames_sent > 100 for m in sim.markets()))
            for m in sim.markets():
                m.faults.drop_diffs = 2
                m.faults.drop_symbol = "ETHUSDT"
            time.sleep(7)
            assert proc.stop() == 0
        finally:
            proc.kill()
    return tmp / "data"


def test_clean_recording_verifies(recorded):
    for market in ("spot", "futures"):
        report = verify.verify(recorded, market)
        assert report["problems"] == [], report["problems"]
        eth = report["symbols"]["ETHUSDT"]
        assert eth["breaks_in_data"] >= 1 and eth["unexplained_breaks"] == []  # the dropped diffs: gap rows
        for sym, r in report["symbols"].items():
            assert r["duplicates"] == 0 and r["crossed"] == 0 and r["negative"] == 0
            # Binance's free checksum: every partial frame at a synced update id equals the rebuilt top N
            assert r["partial_frames_compared"] > 20
            assert r["partial_frames_identical"] == r["partial_frames_compared"], (market, sym)
        compared = [r for r in report["symbols"].values() if r["snapshot_levels_compared"]]
        assert compared
        for r in compared:  # snapshots fall inside a 100 ms window, so a few touched levels differ
            assert r["snapshot_levels_same"] / r["snapshot_levels_compared"] > 0.95


def test_tampered_files_are_found(recorded, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(recorded, data)
    diffs = read_kind(data, "futures", "diff_orderbooks")
    btc = diffs.filter(pa.compute.equal(diffs.column("symbol"), "BTCUSDT")).sort_by("final_update_id")
    # a diff written twice, and one deleted with no gap row
    write_table_atomic(data / "futures/diff_orderbooks/2000-01-01/part-dup.parquet", btc.slice(5, 1), 3)
    victim = btc.column("final_update_id")[10].as_py()
    for f in (data / "futures/diff_orderbooks").rglob("part-*.parquet"):
        t = pq.read_table(f)
        keep = pa.compute.invert(pa.compute.and_(pa.compute.equal(t.column("symbol"), "BTCUSDT"),
                                                 pa.compute.equal(t.column("final_update_id"), victim)))
        if t.filter(keep).num_rows != t.num_rows:
            write_table_atomic(f, t.filter(keep), 3)
    report = verify.verify(data, "futures")
    problems = " ".join(report["problems"])
    assert "BTCUSDT: 1 diffs written more than once" in problems
    assert "BTCUSDT: 1 breaks in the diff chain with no gap row" in problems
    assert verify.main(data, ["futures"], None, as_json=True) == 1


def test_data_api(recorded):
    t = load(recorded, "spot", "diff_orderbooks", symbol="BTCUSDT")
    assert set(t.column("symbol").to_pylist()) == {"BTCUSDT"}
    times = t.column("received_time").to_pylist()
    mid = sorted(times)[len(times) // 2]
    assert load(recorded, "spot", "diff_orderbooks", symbol="BTCUSDT", start=mid).num_rows <= len(times) // 2 + 1
    rebuilt = list(books(recorded, "futures", "BTCUSDT", depth=5))
    assert len(rebuilt) > 20
    for _when, _u, bids, asks in rebuilt:
        assert len(bids) == 5 and bids[0][0] < asks[0][0]
    sparse = list(books(recorded, "futures", "BTCUSDT", depth=5, every_us=1_000_000))
    assert 2 <= len(sparse) < len(rebuilt)
    bids, asks = book_at(recorded, "futures", "BTCUSDT", rebuilt[-1][0], depth=5)
    assert (bids, asks) == (rebuilt[-1][2], rebuilt[-1][3])


def test_real_capture_snapshot_joins_and_rebuilds(tmp_path):
    capture = load_capture(SHARED_DATA, "spot")
    with Simulator(spot=dict(capture=capture, replay_speed=8.0)) as sim:
        cfg = write_config(tmp_path, [market_section("spot", sim.spot, capture.symbols, snapshot_interval=600,
                                                     diff_speed="100ms")])
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("recording market=spot")
            n = sum(1 for f in capture.frames if "@depth" in f[1])
            wait_until(lambda: sim.spot.frames_sent >= n, timeout=60)
            time.sleep(1)
            assert proc.stop() == 0
        finally:
            proc.kill()
    report = verify.verify(tmp_path / "data", "spot")
    assert report["problems"] == []
    nkn = report["symbols"]["NKNUSDT"]
    assert nkn["breaks_in_data"] == 0 and nkn["crossed"] == 0 and nkn["resyncs"] == 0
    rebuilt = list(books(tmp_path / "data", "spot", "NKNUSDT", depth=10))
    assert len(rebuilt) > 100  # the snapshot joined: every later diff applied
    when, u, bids, asks = rebuilt[-1]
    assert bids[0][0] < asks[0][0] and u == max(load(tmp_path / "data", "spot", "diff_orderbooks",
                                                     symbol="NKNUSDT").column("final_update_id").to_pylist())
