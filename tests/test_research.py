"""verify and the data API, on data recorded from the simulator (clean, with injected gaps,
with tampered files) and from a replay of the real captures."""
from __future__ import annotations

import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from markets import FUTURES
from research import verify
from research.data import book_at, books, load
from simulator import Simulator
from simulator.server import load_capture
from storage.files import write_table_atomic
from tests.helpers import SHARED_DATA, CollectorProcess, market_section, read_kind, wait_until, write_config

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
        for r in compared:
            # compared only where both describe the same update id (or without the levels of the
            # diff whose [U, u] holds the snapshot's id): then the rebuilt book agrees 100 %
            assert r["snapshot_levels_same"] == r["snapshot_levels_compared"], (market, r["snapshot_disagreements"])
        assert sum(r["snapshots_compared"] for r in compared) >= 4
        assert "100.00% of" in verify.render(report) and "comparable levels" in verify.render(report)


def test_a_planted_wrong_level_is_named(recorded, tmp_path):
    """One size changed in the snapshots of one symbol (a copy of the clean recording):
    verify names the disagreement, with the snapshot's id, the side and the price."""
    data = tmp_path / "data"
    shutil.copytree(recorded, data)
    folder = data / "futures" / "orderbooks"
    files = sorted(folder.rglob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    for f in files:
        f.unlink()
    rows = table.to_pylist()
    btc = sorted((r for r in rows if r["symbol"] == "BTCUSDT"), key=lambda r: r["lastUpdateId"])
    for r in btc[1:]:  # every snapshot but the one a book starts from
        r["bid_sizes"] = [q + 1.0 for q in r["bid_sizes"]]  # every bid: some are outside any straddling diff
    write_table_atomic(folder / "planted.parquet", pa.Table.from_pylist(rows, schema=table.schema), 9)
    report = verify.verify(data, "futures")
    problems = [x for x in report["problems"] if x.startswith("BTCUSDT: ") and "rebuilt levels disagree" in x]
    assert problems, report["problems"]
    first = report["symbols"]["BTCUSDT"]["snapshot_disagreements"][0]
    planted = next(r for r in btc if r["lastUpdateId"] == first["lastUpdateId"])
    planted_sizes = dict(zip(planted["bid_prices"], planted["bid_sizes"], strict=True))
    assert first["side"] == "bid" and first["snapshot"] == planted_sizes[first["price"]] == first["rebuilt"] + 1.0
    assert not any(x.startswith("ETHUSDT: ") and "disagree" in x for x in report["problems"])
    assert verify.main(data, ["futures"], None, as_json=True) == 1


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


def _final_book(data, market, symbol, depth):
    return list(books(data, market, symbol, depth=depth))


def _assert_top_10_is_the_rebuilt_book(bids: dict, asks: dict, data, symbol: str) -> None:
    """A book replayed from an export agrees with the last book rebuilt from the recording."""
    last = _final_book(data, "futures", symbol, 10)[-1]
    assert sorted(bids.items(), reverse=True)[:10] == [tuple(x) for x in last[2]]
    assert sorted(asks.items())[:10] == [tuple(x) for x in last[3]]


def test_tardis_incremental_l2_round_trip(recorded, tmp_path):
    import csv
    import gzip

    from research.export import incremental_book_l2
    out = tmp_path / "l2.csv.gz"
    n = incremental_book_l2(recorded, "futures", "ETHUSDT", out)  # ETHUSDT has gaps: resyncs are exported
    with gzip.open(out, "rt") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n > 0
    assert list(rows[0]) == ["exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side",
                             "price", "amount"]
    bids, asks, in_snapshot = {}, {}, False
    for r in rows:
        snap = r["is_snapshot"] == "true"
        if snap and not in_snapshot:
            bids, asks = {}, {}
        in_snapshot = snap
        side = bids if r["side"] == "bid" else asks
        p, q = float(r["price"]), float(r["amount"])
        if q == 0:
            side.pop(p, None)
        else:
            side[p] = q
    _assert_top_10_is_the_rebuilt_book(bids, asks, recorded, "ETHUSDT")


def test_tardis_book_snapshot_25_round_trip(recorded, tmp_path):
    import csv
    import gzip

    from research.export import book_snapshot_25
    out = tmp_path / "s25.csv.gz"
    n = book_snapshot_25(recorded, "spot", "BTCUSDT", out)
    expected = _final_book(recorded, "spot", "BTCUSDT", 25)
    with gzip.open(out, "rt") as f:
        rows = list(csv.DictReader(f))
    assert n == len(rows) == len(expected)
    for row, (when, _, bids, asks) in zip(rows, expected, strict=True):
        assert int(row["local_timestamp"]) == when
        assert [(float(row[f"bids[{i}].price"]), float(row[f"bids[{i}].amount"])) for i in range(len(bids))] == bids
        assert float(row["asks[0].price"]) == asks[0][0]


def test_hftbacktest_round_trip(recorded, tmp_path):
    import numpy as np

    from research.export import BUY_EVENT, DEPTH_CLEAR_EVENT, HFT_DTYPE, hftbacktest
    out = tmp_path / "h.npz"
    n = hftbacktest(recorded, "futures", "BTCUSDT", out)
    data = np.load(out)["data"]
    assert data.dtype == HFT_DTYPE and len(data) == n
    assert (np.diff(data["local_ts"]) >= 0).sum() > 0.9 * n
    bids, asks = {}, {}
    for ev, px, qty in zip(data["ev"], data["px"], data["qty"], strict=True):
        side = bids if ev & BUY_EVENT else asks
        if ev & 0xFF == DEPTH_CLEAR_EVENT:
            side.clear()
        elif qty == 0:
            side.pop(px, None)
        else:
            side[px] = qty
    _assert_top_10_is_the_rebuilt_book(bids, asks, recorded, "BTCUSDT")


def test_report_png_has_its_panels(recorded, tmp_path):
    from PIL import Image

    from research.report import PANELS, report
    from storage.files import day_of
    day = day_of(read_kind(recorded, "spot", "diff_orderbooks").column("received_time")[0].as_py())
    png, summary, titles = report(recorded, "spot", day, tmp_path)
    assert titles == PANELS
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 1000
    assert "diffs:" in summary and "receive latency p50" in summary and "gaps: " in summary
    # the books: mid and spread, and the depth heatmap, for each of the most recorded symbols
    books = tmp_path / f"report-spot-{day}-books.png"
    assert f"books: {books}" in summary
    with Image.open(books) as im:
        assert im.format == "PNG" and im.size[0] >= 1000


def test_books_picture_marks_the_gaps(tmp_path):
    """The books picture of a day with a break: drawn, and the break is where it is marked."""
    from PIL import Image

    from research.report import books_figure, gap_marks
    from storage.files import day_start_us
    from storage.schemas import SCHEMAS

    day = "2031-01-02"
    start = day_start_us(day)
    n = 50
    rows = {"received_time": [start + i * 60_000_000 for i in range(n)], "event_time": [None] * n,
            "symbol": ["BTCUSDT"] * n, "first_update_id": [None] * n, "final_update_id": list(range(n)),
            "prev_final_update_id": [None] * n, "transaction_time": [None] * n,
            "bid_prices": [[100.0 + i * 0.1, 99.9 + i * 0.1] for i in range(n)], "bid_sizes": [[1.0, 2.0]] * n,
            "ask_prices": [[100.2 + i * 0.1, 100.3 + i * 0.1] for i in range(n)], "ask_sizes": [[1.5, 0.5]] * n}
    write_table_atomic(tmp_path / "spot" / "partial_orderbooks" / f"{day}.parquet",
                       pa.table(rows, schema=SCHEMAS["partial_orderbooks"]), 3)
    gaps = {"detected_time": [start + 20 * 60_000_000, start], "symbol": ["BTCUSDT", "BTCUSDT"],
            "last_final_update_id": [19, None], "next_first_update_id": [25, 0], "reason": ["sequence", "start"]}
    write_table_atomic(tmp_path / "spot" / "gaps" / f"{day}.parquet", pa.table(gaps, schema=SCHEMAS["gaps"]), 3)
    assert gap_marks(tmp_path, "spot", day) == [("BTCUSDT", 20.0)]  # `start` is not a break
    png = books_figure(tmp_path, "spot", day, tmp_path / "out")
    assert png is not None
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 1000


def test_a_snapshot_is_compared_after_the_diff_that_ends_at_its_id():
    """A snapshot with lastUpdateId L holds the diff ending at L: a synced book is compared
    with it after applying that diff (verify once compared before, and disagreed)."""
    from research.verify import _rebuild

    def snap(L, bids):
        return {"lastUpdateId": L, "bid_prices": [p for p, _ in bids], "bid_sizes": [q for _, q in bids],
                "ask_prices": [200.0], "ask_sizes": [1.0]}

    def diff(U, u, pu, bids):
        return {"first_update_id": U, "final_update_id": u, "prev_final_update_id": pu,
                "bid_prices": [p for p, _ in bids], "bid_sizes": [q for _, q in bids], "ask_prices": [], "ask_sizes": []}

    chain = [diff(5, 10, 4, [(100.0, 1.0)]), diff(11, 20, 10, [(99.0, 2.0)]), diff(21, 30, 20, [(99.0, 3.0)])]
    snaps = [snap(10, [(100.0, 1.0)]), snap(30, [(99.0, 3.0), (100.0, 1.0)])]
    out = _rebuild(chain, snaps, [], FUTURES)
    assert out["snapshots_compared"] == 1 and out["snapshots_not_comparable"] == 0
    assert out["snapshot_levels_same"] == out["snapshot_levels_compared"] == 3  # 99.0 at 3.0, 100.0 and the ask


@given(st.lists(st.tuples(st.booleans(), st.integers(90, 110), st.sampled_from([0.0, 1.0, 2.0, -1.0])), max_size=60))
def test_book_crossed_and_negative_agree_with_a_full_scan(ops):
    """The cached best prices and the per-diff negative count give what a scan of the
    whole book gives, after every diff."""
    from research.book import Book

    book = Book(FUTURES)
    book.reset(1, [95.0], [1.0], [105.0], [1.0])
    for i, (bid, price, qty) in enumerate(ops):
        side = ([float(price)], [qty], [], []) if bid else ([], [], [float(price)], [qty])
        book.apply(i + 2, *side)
        full = bool(book.bids and book.asks) and max(book.bids) >= min(book.asks)
        assert book.crossed() == full
        assert book.negative() == (qty < 0)
