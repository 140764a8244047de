"""`collector.py replay`: a recorded day served back over the Binance protocol.

A collector pointed at the replay re-records the day (every diff and partial row, all
columns but `received_time`), for spot, USD-M and COIN-M, on simulated data and on the
real captures; the books it rebuilds agree with the recorded snapshots; Binance's own
Python connector, given only the replay's URLs, builds a book equal to the recording's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from hypothesis import given
from hypothesis import strategies as st

from markets import MARKETS as MARKETS_BY_NAME
from research import verify
from research.data import books, load, synced_updates
from serve.replay import decimals, number
from simulator import Simulator
from simulator.server import load_capture
from tests.faults import pause_and_stop
from tests.helpers import ROOT, SHARED_DATA, CollectorProcess, market_section, wait_until, write_config
from tests.test_upload import s3  # noqa: F401  (the test S3 server, a fixture)

MARKETS = ("spot", "futures", "delivery")
SYMBOLS = {"spot": ["BTCUSDT", "ETHUSDT", "BNBUSDT"], "futures": ["BTCUSDT", "ETHUSDT", "BNBUSDT"],
           "delivery": ["BTCUSD_PERP", "ETHUSD_PERP"]}
DEPTH_KINDS = ("diff_orderbooks", "partial_orderbooks")


def day_of_recording(data: Path) -> str:
    """The recorded day (the one with the most diff rows, should a run cross midnight)."""
    days = {}
    for folder in data.glob("*/diff_orderbooks/*"):
        days[folder.name] = days.get(folder.name, 0) + sum(1 for _ in folder.glob("*.parquet"))
    return max(days, key=days.get)


def rows_of(data: Path, market: str, kind: str, day: str | None = None) -> list[dict]:
    """A market's rows of a kind (of one day), without received_time, in a stable order."""
    folder = data / market / kind
    files = sorted((folder / day).glob("*.parquet") if day else folder.rglob("*.parquet"))
    if not files:
        return []
    rows = ds.dataset(files, format="parquet").to_table().drop_columns(["received_time"]).to_pylist()
    return sorted(rows, key=lambda r: (r["symbol"], r["final_update_id"]))


class ReplayProcess(CollectorProcess):
    """`collector.py replay` on free ports; `urls[market]` = (ws_url, rest_url) from its log."""

    def __init__(self, folder: Path, data: Path | str, day: str, *extra: str, markets=MARKETS, env=None):
        folder.mkdir(parents=True, exist_ok=True)
        ports = [a for m in markets for a in (f"--{m}-port", "0")]
        super().__init__(None, "replay", "--data", str(data), "--day", day, *ports, *extra, env=env, folder=folder)
        self.urls: dict[str, tuple[str, str]] = {}
        for m in markets:
            self.wait_for_log(f"replay market={m} ", timeout=60)
        for line in self.log.splitlines():
            if "replay market=" in line:
                words = dict(w.split("=", 1) for w in line.split() if "=" in w)
                self.urls[words["market"]] = (words["ws_url"], words["rest_url"])


def recorded_books(data: Path, market: str, symbol: str) -> dict[int, tuple[dict, dict, object]]:
    """The recorded book after every applied diff, by its `u`: (bids, asks, the book),
    rebuilt by `research.data.synced_updates` (the book tells which prices it knows)."""
    out = {}
    for what, row, book in synced_updates(data, market, symbol):
        if what == "diff":
            out[row["final_update_id"]] = (dict(book.bids), dict(book.asks), (book.bid_floor, book.ask_ceiling,
                                                                               set(book.known_beyond)))
    return out


def assert_same_book(client_bids, client_asks, truth: tuple[dict, dict, tuple]) -> None:
    """A client's book (levels as [price, size] texts or numbers) against the recorded one at
    the same update id: every level at a price both know, however deep (the recorded book
    knows prices inside its first snapshot's range and what diffs set beyond it; the client
    those down to its own deepest level) has the same size."""
    bids, asks, (floor, ceiling, beyond) = truth
    theirs = {float(p): float(q) for p, q in client_bids}, {float(p): float(q) for p, q in client_asks}
    compared = 0
    for side, mine, client in (("bid", bids, theirs[0]), ("ask", asks, theirs[1])):
        if not client:
            assert not mine, side
            continue
        if side == "bid":
            lowest = min(client)
            known = {p for p in set(mine) | set(client) if p >= lowest and (floor is None or p >= floor or p in beyond)}
        else:
            highest = max(client)
            known = {p for p in set(mine) | set(client) if p <= highest and (ceiling is None or p <= ceiling or p in beyond)}
        wrong = [(p, mine.get(p), client.get(p)) for p in sorted(known) if mine.get(p) != client.get(p)]
        assert not wrong, (side, wrong[:5], len(wrong), len(known))
        compared += len(known)
    assert compared > 20, compared


def run_replay(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("R2_")}
    return subprocess.run([sys.executable, str(ROOT / "collector.py"), "replay", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def rerecord(tmp: Path, data: Path, day: str, symbols: dict[str, list[str]], markets=MARKETS, **market_keys) -> Path:
    """Replay `day` of `data` at speed 0 to a fresh collector; returns the new data_dir.
    The first frame waits 4 s after the first subscription, for every market's
    connections of the collector to be subscribed (on a busy CI box they open over a
    second or more)."""
    rp = ReplayProcess(tmp / "replay", data, day, "--speed", "0", "--start-delay", "4",
                       markets=markets)
    try:
        sections = []
        for m in markets:
            ws, rest = rp.urls[m]
            sim = type("Urls", (), {"ws_url": ws, "rest_url": rest})
            sections.append(market_section(m, sim, symbols[m], snapshot_interval=600, **market_keys))
        (tmp / "again").mkdir()
        cfg = write_config(tmp / "again", sections)
        proc = CollectorProcess(cfg)
        try:
            rp.wait_for_log("done:", timeout=120)
            time.sleep(1.5)  # the last frames land
            assert proc.stop() == 0, proc.log[-3000:]
        finally:
            proc.kill()
        assert "Traceback" not in proc.log
        assert rp.stop() == 0, rp.log[-3000:]
    finally:
        rp.kill()
    assert "Traceback" not in rp.log, rp.log
    return tmp / "again" / "data"


def assert_same_rows(original: Path, again: Path, day: str, markets=MARKETS) -> None:
    for m in markets:
        for kind in DEPTH_KINDS:
            before, after = rows_of(original, m, kind, day), rows_of(again, m, kind)
            assert before, (m, kind)
            assert len(after) == len(before), (m, kind, len(after), len(before))
            assert after == before, (m, kind)


def assert_books_agree_with_recorded_snapshots(original: Path, again: Path, day: str, tmp: Path,
                                               markets=MARKETS) -> None:
    """verify over the re-recorded diffs and partial frames with the original snapshots:
    every comparable level agrees."""
    check = tmp / "check"
    for m in markets:
        for kind in ("diff_orderbooks", "partial_orderbooks", "gaps"):
            shutil.copytree(again / m / kind, check / m / kind)
        shutil.copytree(original / m / "orderbooks" / day, check / m / "orderbooks" / day)
        report = verify.verify(check, m, day=None)
        assert report["problems"] == [], (m, report["problems"])
        compared = [r for r in report["symbols"].values() if r["snapshot_levels_compared"]]
        assert compared, m
        for r in compared:
            assert r["snapshot_levels_same"] == r["snapshot_levels_compared"], (m, r)


def record(folder: Path, symbols: dict[str, list[str]], snapshot_interval: int, frames: int, seconds: float) -> Path:
    """The simulator's markets (40 updates/s a symbol) recorded by a collector: once every
    market has sent `frames`, for `seconds` more; snapshots of 100 levels. The data_dir."""
    with Simulator(**{m: dict(symbols=names, updates_per_s=40) for m, names in symbols.items()}) as sim:
        cfg = write_config(folder, [market_section(m, getattr(sim, m), names, snapshot_interval=snapshot_interval,
                                                   snapshot_limit=100) for m, names in symbols.items()])
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log(f"recording market={list(symbols)[-1]}")
            wait_until(lambda: all(m.frames_sent > frames for m in sim.markets()), timeout=30)
            time.sleep(seconds)
            rc, = pause_and_stop(sim, proc)
        finally:
            proc.kill()
    assert rc == 0, proc.log[-3000:]
    return folder / "data"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """All three markets from the simulator for ~6 s, snapshots every 2 s."""
    return record(tmp_path_factory.mktemp("rec"), SYMBOLS, snapshot_interval=2, frames=300, seconds=3)


def test_a_collector_re_records_a_simulated_day(recorded, tmp_path):
    day = day_of_recording(recorded)
    again = rerecord(tmp_path, recorded, day, SYMBOLS, snapshot_limit=100)
    assert_same_rows(recorded, again, day)
    assert_books_agree_with_recorded_snapshots(recorded, again, day, tmp_path)


def test_a_collector_re_records_the_real_captures(tmp_path):
    """The real Binance traffic of each market, recorded, replayed and recorded again."""
    captures = {m: load_capture(SHARED_DATA, m) for m in MARKETS}
    (tmp_path / "first").mkdir()
    with Simulator(**{m: dict(capture=c, record=True, replay_speed=8.0) for m, c in captures.items()}) as sim:
        cfg = write_config(tmp_path / "first", [market_section(m, getattr(sim, m), c.symbols, snapshot_interval=600,
                                                               snapshot_limit=1000, diff_speed="100ms")
                                                for m, c in captures.items()])
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("recording market=delivery")
            wanted = {m: {d for _, n, d in c.frames if "@depth" in n} for m, c in captures.items()}
            wait_until(lambda: all(wanted[m.market.name] <= {s.data for s in m.sent} for m in sim.markets()),
                       timeout=90, interval=0.5)
            time.sleep(1.0)
            assert proc.stop() == 0, proc.log[-3000:]
        finally:
            proc.kill()
    original = tmp_path / "first" / "data"
    day = day_of_recording(original)
    again = rerecord(tmp_path, original, day, {m: c.symbols for m, c in captures.items()}, snapshot_limit=1000,
                     diff_speed="100ms")
    for m in MARKETS:  # the real captures carry diffs only
        before, after = rows_of(original, m, "diff_orderbooks", day), rows_of(again, m, "diff_orderbooks")
        assert before and after == before, m
    # each capture holds one snapshot a symbol: REST serves it before the clock starts, and
    # the book at the clock after; either way the recorded book at its id, and it joins the diffs
    for m in MARKETS:
        recorded_snapshots = {r["lastUpdateId"]: r for r in load(original, m, "orderbooks").to_pylist()}
        for got in load(again, m, "orderbooks").to_pylist():
            if got["lastUpdateId"] in recorded_snapshots:
                r = recorded_snapshots[got["lastUpdateId"]]
                assert {k: got[k] for k in ("symbol", "bid_prices", "bid_sizes", "ask_prices", "ask_sizes")} == \
                       {k: r[k] for k in ("symbol", "bid_prices", "bid_sizes", "ask_prices", "ask_sizes")}
            else:
                truth = recorded_books(original, m, got["symbol"])[got["lastUpdateId"]]
                assert_same_book(list(zip(got["bid_prices"], got["bid_sizes"], strict=True)),
                                 list(zip(got["ask_prices"], got["ask_sizes"], strict=True)), truth)
        report = verify.verify(again, m)
        assert report["problems"] == [], (m, report["problems"])


def test_binance_connector_builds_the_recorded_book(recorded, tmp_path):
    """Binance's official Python connector (binance-connector), given only the replay's URLs:
    its diff stream and REST depth build, by Binance's documented procedure, the same book
    as the recording at every update."""
    from binance.spot import Spot
    from binance.websocket.spot.websocket_stream import SpotWebsocketStreamClient

    day = day_of_recording(recorded)
    symbol = "BTCUSDT"
    rp = ReplayProcess(tmp_path, recorded, day, "--speed", "4", "--start-delay", "2",
                       markets=("spot", "futures"))
    ws_url, rest_url = rp.urls["spot"]
    events: list[dict] = []
    partials: list[dict] = []
    subscribed = threading.Event()

    def on_message(_, text):
        msg = json.loads(text)
        if "result" in msg:
            subscribed.set()
        elif msg.get("e") == "depthUpdate":
            events.append(msg)
        elif "lastUpdateId" in msg:
            partials.append(msg)

    client = SpotWebsocketStreamClient(stream_url=ws_url, on_message=on_message)
    rest = Spot(base_url=rest_url)
    snapshots = []
    try:
        client.partial_book_depth(symbol, level=5, speed=100, id=2)  # recorded: 20 levels
        client.diff_book_depth(symbol, speed=100, id=1)
        assert subscribed.wait(10), rp.log
        # Binance's procedure: a snapshot that the first diff after it does not join is
        # fetched again; here one is fetched a few times a replayed second, and the
        # first that joins is used
        while "done:" not in rp.log:
            snapshots.append(rest.depth(symbol, limit=100))
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        client.stop()
        rp.stop()
        rp.kill()
    assert "pacing: late p50" in rp.log  # speed > 0: how late frames left is reported
    # a depth5 stream of a day recorded at depth20: every recorded frame, its top 5 levels
    top = sorted(load(recorded, "spot", "partial_orderbooks", symbol=symbol).to_pylist(),
                 key=lambda r: (r["received_time"], r["final_update_id"]))  # as recorded (an id may repeat)
    assert [m["lastUpdateId"] for m in partials] == [r["final_update_id"] for r in top] and len(top) > 20
    for msg, r in zip(partials, top, strict=True):
        assert [[float(p), float(q)] for p, q in msg["bids"]] == [list(x) for x in zip(r["bid_prices"][:5],
                                                                                     r["bid_sizes"][:5], strict=True)]
        assert len(msg["asks"]) == min(5, len(r["ask_prices"]))
    # REST answers the book at the replay clock, as Binance writes it (8 decimals on spot):
    # before the clock starts, the earliest recorded snapshot the recorded diffs join; then
    # the recorded book at the last diff sent, which the next diff joins (a client that
    # joins late syncs at once)
    recorded_snaps = {r["lastUpdateId"]: r for r in load(recorded, "spot", "orderbooks", symbol=symbol).to_pylist()}
    first_diff = min(load(recorded, "spot", "diff_orderbooks", symbol=symbol).to_pylist(),
                     key=lambda r: r["received_time"])
    assert snapshots[0]["lastUpdateId"] == min(i for i in recorded_snaps if i >= first_diff["first_update_id"] - 1)
    assert all(len(p.split(".")[1]) == 8 for s in snapshots for p, _ in s["bids"] + s["asks"])
    truth = recorded_books(recorded, "spot", symbol)
    later = [s for s in snapshots if s["lastUpdateId"] in truth]
    assert len(later) > 10, (len(later), len(snapshots))
    for snap in later:
        assert_same_book(snap["bids"], snap["asks"], truth[snap["lastUpdateId"]])
        following = next((e for e in events if e["u"] > snap["lastUpdateId"]), None)
        assert following is None or following["U"] == snap["lastUpdateId"] + 1, (following, snap["lastUpdateId"])
    snapshot = next(s for s in snapshots if any(e["U"] <= s["lastUpdateId"] + 1 <= e["u"] for e in events))
    # the documented local book: drop diffs the snapshot holds, the first joins it, then each chains
    bids = {float(p): float(q) for p, q in snapshot["bids"]}
    asks = {float(p): float(q) for p, q in snapshot["asks"]}
    last = snapshot["lastUpdateId"]
    mine: dict[int, tuple] = {}
    synced = False
    for e in events:
        if e["u"] <= last:
            continue
        if not synced:
            assert e["U"] <= last + 1 <= e["u"], (e["U"], e["u"], last)
            synced = True
        else:
            assert e["U"] == last + 1
        for side, levels in ((bids, e["b"]), (asks, e["a"])):
            for p, q in levels:
                if float(q) == 0:
                    side.pop(float(p), None)
                else:
                    side[float(p)] = float(q)
        last = e["u"]
        mine[last] = (sorted(bids.items(), reverse=True)[:10], sorted(asks.items())[:10])
    rebuilt = {u: ([tuple(x) for x in b], [tuple(x) for x in a]) for _, u, b, a in books(recorded, "spot", symbol, depth=10)}
    common = set(mine) & set(rebuilt)
    assert len(common) > 50, (len(mine), len(rebuilt))
    assert all(mine[u] == rebuilt[u] for u in common)
    assert max(mine) == max(rebuilt)  # to the day's last update


def test_spot_times_come_in_the_unit_each_client_asked_for(recorded, tmp_path):
    """Spot JSON clients get the recorded times in ms, as Binance sends them unless asked;
    one that asks `timeUnit=MICROSECOND` gets them in µs: both the recorded event_time."""
    import websocket

    day = day_of_recording(recorded)
    rp = ReplayProcess(tmp_path, recorded, day, "--speed", "0", "--start-delay", "2", markets=("spot", "futures"))
    ws_url, _ = rp.urls["spot"]
    got: dict[bool, list[dict]] = {False: [], True: []}

    def read(micro: bool) -> None:
        ws = websocket.create_connection(f"{ws_url}/stream?streams=btcusdt@depth@100ms"
                                         + ("&timeUnit=MICROSECOND" if micro else ""), timeout=20)
        try:
            while message := ws.recv():  # "" once the replay closed the connection
                got[micro].append(json.loads(message)["data"])
        except (websocket.WebSocketException, OSError):
            return  # the replay ended the connection, or went quiet: done
        finally:
            ws.close()

    readers = [threading.Thread(target=read, args=(micro,), daemon=True) for micro in (False, True)]
    try:
        for t in readers:
            t.start()
        rp.wait_for_log("done:", timeout=120)
    finally:
        rp.stop()
        rp.kill()
    for t in readers:
        t.join(30)
    recorded_us = {r["final_update_id"]: r["event_time"]
                   for r in load(recorded, "spot", "diff_orderbooks", symbol="BTCUSDT").to_pylist()}
    assert len(got[False]) == len(got[True]) == len(recorded_us) > 20
    assert all(m["E"] == recorded_us[m["u"]] // 1000 for m in got[False])
    assert all(m["E"] == recorded_us[m["u"]] for m in got[True])
    assert any(t % 1000 for t in recorded_us.values())  # the µs digits are really there


def test_clients_ping_first_and_subscribe_on_a_connection_of_their_own_name(recorded, tmp_path):
    """What clients do before they read a book: ping each market (`{}`), ask exchangeInfo
    for some symbols (refusals in Binance's shapes), and open a raw connection under a name
    of their own (ccxt opens `/ws/0`) and SUBSCRIBE on it; the replay serves the recorded
    diffs on that connection."""
    import urllib.error
    import urllib.request

    import websocket

    day = day_of_recording(recorded)
    rp = ReplayProcess(tmp_path, recorded, day, "--speed", "0", "--start-delay", "1")
    try:
        for market, path in (("spot", "/api/v3/ping"), ("futures", "/fapi/v1/ping"), ("delivery", "/dapi/v1/ping")):
            with urllib.request.urlopen(rp.urls[market][1] + path, timeout=10) as r:
                assert r.status == 200 and json.loads(r.read()) == {}
        # exchangeInfo of some symbols, and Binance's answers to what it refuses
        rest = rp.urls["futures"][1] + "/fapi/v1/exchangeInfo"
        with urllib.request.urlopen(rest + "?symbol=ethusdt", timeout=10) as r:
            info = json.loads(r.read())
        assert [s["symbol"] for s in info["symbols"]] == ["ETHUSDT"]
        assert info["symbols"][0]["contractType"] == "PERPETUAL" and info["symbols"][0]["marginAsset"] == "USDT"
        # the tick and step sizes are those the recorded prices and sizes need
        levels = [r for r in load(recorded, "futures", "orderbooks", symbol="ETHUSDT").to_pylist()]
        price_places = max(decimals(r["bid_prices"][:50] + r["ask_prices"][:50]) for r in levels)
        size_places = max(decimals(r["bid_sizes"][:50] + r["ask_sizes"][:50]) for r in levels)
        filters = {f["filterType"]: f for f in info["symbols"][0]["filters"]}
        assert float(filters["PRICE_FILTER"]["tickSize"]) == 10.0 ** -price_places
        assert float(filters["LOT_SIZE"]["stepSize"]) == 10.0 ** -size_places
        assert (info["symbols"][0]["pricePrecision"], info["symbols"][0]["quantityPrecision"]) == (price_places,
                                                                                                   size_places)
        with urllib.request.urlopen(rest + '?symbols=["BTCUSDT","BNBUSDT"]'.replace('"', "%22"), timeout=10) as r:
            assert [s["symbol"] for s in json.loads(r.read())["symbols"]] == ["BTCUSDT", "BNBUSDT"]
        for query, code in (("?symbol=NOPEUSDT", -1121), ("?symbols=BTCUSDT", -1100), ("?symbol=BTCUSDT&symbols=[]", -1101)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(rest + query.replace('"', "%22"), timeout=10)
            assert refused.value.code == 400 and json.loads(refused.value.read())["code"] == code
        # every speed a client may ask for, the default spelled out or left out, is served
        # from the recorded frames (connections open before the replay's clock starts)
        asked = {"spot": ["ethusdt@depth@1000ms", "bnbusdt@depth"], "futures": ["ethusdt@depth@250ms"]}
        speeds = {m: websocket.create_connection(rp.urls[m][0] + "/stream?streams=" + "/".join(streams), timeout=20)
                  for m, streams in asked.items()}
        ws = websocket.create_connection(rp.urls["spot"][0] + "/ws/0", timeout=20)
        try:
            ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@depth@100ms"], "id": 7}))
            assert json.loads(ws.recv()) == {"result": None, "id": 7}
            first = json.loads(ws.recv())
            for m, conn in speeds.items():
                seen = set()
                while len(seen) < len(asked[m]):
                    seen.add(json.loads(conn.recv())["stream"])
                assert seen == set(asked[m])
        finally:
            ws.close()
            for conn in speeds.values():
                conn.close()
    finally:
        rp.stop()
        rp.kill()
    recorded_ids = {r["final_update_id"] for r in load(recorded, "spot", "diff_orderbooks", symbol="BTCUSDT").to_pylist()}
    assert first["e"] == "depthUpdate" and first["s"] == "BTCUSDT" and first["u"] in recorded_ids


def test_a_selection_of_symbols_and_seconds_is_what_is_served(recorded, tmp_path):
    """`--symbols ETHUSDT --from --to`: the chosen symbol's recorded diffs in that window,
    every one and nothing else, on every market; other symbols are unknown to the replay;
    REST depth at the start is the book the diffs before --from built (they are read
    as warm-up, not sent), so the first diff sent joins it."""
    import urllib.error
    import urllib.request

    import websocket

    day = day_of_recording(recorded)
    diffs = {m: load(recorded, m, "diff_orderbooks", symbol="ETHUSDT").to_pylist() for m in ("spot", "futures")}
    times = sorted(r["received_time"] for r in diffs["spot"])
    start = (times[len(times) // 3] // 10**6 + 1) * 10**6  # whole seconds, inside the recording
    end = start + 2 * 10**6
    clock = lambda us: time.strftime("%H:%M:%S", time.gmtime(us / 1e6))  # noqa: E731
    rp = ReplayProcess(tmp_path, recorded, day, "--speed", "1", "--start-delay", "1", "--symbols", "ethusdt",
                       "--from", clock(start), "--to", clock(end), markets=("spot", "futures"))
    got: dict[str, list[dict]] = {}
    try:
        for m in ("spot", "futures"):
            ws, rest = rp.urls[m]
            with pytest.raises(urllib.error.HTTPError):  # not in the selection: unknown here
                urllib.request.urlopen(rest + ("/api/v3" if m == "spot" else "/fapi/v1") + "/depth?symbol=BTCUSDT",
                                       timeout=10)
        conns = {m: websocket.create_connection(rp.urls[m][0] + "/ws/ethusdt@depth@100ms", timeout=20)
                 for m in ("spot", "futures")}
        try:
            for m, conn in conns.items():
                got[m] = [json.loads(conn.recv())]
            spot_rest = rp.urls["spot"][1] + "/api/v3/depth?symbol=ETHUSDT&limit=1000"
            with urllib.request.urlopen(spot_rest, timeout=10) as r:
                snap = json.loads(r.read())
            rp.wait_for_log("done:", timeout=60)
            for m, conn in conns.items():
                conn.settimeout(2)
                try:
                    while True:
                        got[m].append(json.loads(conn.recv()))
                except (websocket.WebSocketTimeoutException, websocket.WebSocketConnectionClosedException):
                    pass
        finally:
            for conn in conns.values():
                conn.close()
    finally:
        rp.stop()
        rp.kill()
    for m in ("spot", "futures"):
        wanted = sorted(r["final_update_id"] for r in diffs[m] if start <= r["received_time"] < end)
        assert len(wanted) > 10, (m, len(wanted))
        assert sorted(e["u"] for e in got[m]) == wanted, m
        assert {e["s"] for e in got[m]} == {"ETHUSDT"}
    # the REST answer (asked after the first frame) is the book at the clock: the next diff joins it
    following = next(e for e in got["spot"] if e["u"] > snap["lastUpdateId"])
    assert following["U"] == snap["lastUpdateId"] + 1
    assert_same_book(snap["bids"], snap["asks"], recorded_books(recorded, "spot", "ETHUSDT")[snap["lastUpdateId"]])


def test_a_selection_reads_only_the_row_groups_that_can_hold_it(tmp_path):
    """A day file sorted by symbol, then time, in small row groups: the chosen symbols and
    window read only the groups whose statistics can hold them (Arrow alone, given `isin`,
    read nearly all), and the rows are exactly the chosen ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from serve.replay import Selection
    from storage.merge import open_source
    from storage.schemas import SCHEMAS

    schema = SCHEMAS["diff_orderbooks"]
    symbols = [f"S{i:03d}USDT" for i in range(40)]
    rows = [{"symbol": s, "received_time": 1_000_000 * t, "event_time": 1_000_000 * t, "first_update_id": t,
             "final_update_id": t} for s in symbols for t in range(100)]
    path = tmp_path / "spot" / "diff_orderbooks" / "2026-12-06.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=50)  # 2 groups a symbol
    data = open_source(str(tmp_path))
    chosen = Selection(frozenset({"S003USDT", "S017USDT", "S039USDT"}))
    narrowed = chosen.narrowed(ds.dataset(str(path), format="parquet", schema=schema), 60_000_000, 70_000_000)
    assert sorted(f.row_groups[0].id for f in narrowed.get_fragments()) == [7, 35, 79]  # 60-69 s: a symbol's 2nd
    got = pa.Table.from_batches(chosen.scan(str(path), data, "diff_orderbooks", 60_000_000, 70_000_000))
    assert sorted(zip(got.column("symbol").to_pylist(), got.column("final_update_id").to_pylist(), strict=True)) == [
        (s, t) for s in ("S003USDT", "S017USDT", "S039USDT") for t in range(60, 70)]
    everything = Selection().narrowed(ds.dataset(str(path), format="parquet", schema=schema), None, None)
    assert sum(f.metadata.num_row_groups for f in everything.get_fragments()) == 80


def test_a_long_day_is_merged_in_order_a_few_runs_at_a_time(recorded, tmp_path, monkeypatch):
    """Tiny runs (hundreds of them, merged 3 at a time, then at most 3 kinds x 1 run
    each... ) give every row once, in time order, and hold only a row group per run."""
    from serve import replay
    from storage.merge import open_source

    monkeypatch.setattr(replay, "RUN_BYTES", 16 << 10)
    monkeypatch.setattr(replay, "BATCH_BYTES", 4 << 10)
    monkeypatch.setattr(replay, "FAN_IN", 3)
    day = day_of_recording(recorded)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ordered = replay.order_day(open_source(str(recorded)), day, [MARKETS_BY_NAME[m] for m in MARKETS], scratch)
    assert len(ordered.runs) <= 2 * len(ordered.sources)  # reduced: the final merge holds few row groups
    assert len(list(scratch.iterdir())) == len(ordered.runs)  # merged runs are deleted
    seen: dict[tuple[str, str], list[tuple[str, int]]] = {}
    last = 0
    for pieces in replay.merged(ordered.runs):
        first_of_round = min(int(p.times[0]) for p in pieces)
        assert first_of_round >= last
        last = max(int(p.times[-1]) for p in pieces)
        for p in pieces:
            market, kind = ordered.sources[p.source]
            ids = p.table.column(replay.ID[kind]).to_pylist()
            seen.setdefault((market.name, kind), []).extend(zip(p.table.column("symbol").to_pylist(), ids, strict=True))
    for (market, kind), got in seen.items():
        expected = ds.dataset(sorted((recorded / market / kind / day).glob("*.parquet"))).to_table()
        assert sorted(got) == sorted(zip(expected.column("symbol").to_pylist(),
                                         expected.column(replay.ID[kind]).to_pylist(), strict=True)), (market, kind)
    assert {m for m, _ in seen} == set(MARKETS)


def test_a_day_is_put_in_order_a_slice_at_a_time(recorded, tmp_path, monkeypatch):
    """Slices of one second, then two (each put in order while the one before is served):
    every row of the day once, in time order across slices, and a served slice's scratch
    files gone; with --from, before it only the diffs and snapshots from each symbol's
    latest snapshot on (the books' warm-up), every row after it."""
    import asyncio

    from serve import replay
    from storage.merge import open_source

    monkeypatch.setattr(replay, "FIRST_SLICE_US", 10**6)
    monkeypatch.setattr(replay, "LONGEST_SLICE_US", 2 * 10**6)
    day = day_of_recording(recorded)
    markets = [MARKETS_BY_NAME[m] for m in MARKETS]
    source = open_source(str(recorded))
    times = sorted(r["received_time"] for r in load(recorded, "spot", "diff_orderbooks").to_pylist())

    def walk(selection: replay.Selection, scratch: Path) -> list[tuple]:
        scratch.mkdir()
        plan = replay.plan_day(source, day, markets, selection)
        slices = replay.Slices(source, day, markets, scratch, selection, plan)
        assert len(slices.windows) >= 3, slices.windows

        async def rows() -> list[tuple]:
            out = []
            rp = replay.Replay(replay.Day(), day, 0)
            while (sliced := await slices.next()) is not None:
                assert len(list(scratch.iterdir())) <= 2  # the slice served, the next being ordered
                out += [(m.name, kind, cols["symbol"][i], t) for m, kind, cols, i, t in rp._rows(sliced)]
            return out

        return asyncio.run(rows())

    got = walk(replay.Selection(), tmp_path / "all")
    assert [t for *_, t in got] == sorted(t for *_, t in got)
    for market in MARKETS:
        for kind in ("diff_orderbooks", "partial_orderbooks", "orderbooks"):
            want = len(load(recorded, market, kind).to_pylist())
            assert sum(1 for m, k, *_ in got if (m, k) == (market, kind)) == want, (market, kind)
    start = (times[len(times) // 2] // 10**6) * 10**6
    got = walk(replay.Selection(start_us=start), tmp_path / "from")
    before = [(m, k) for m, k, _, t in got if t < start]
    assert before and {k for _, k in before} <= {"diff_orderbooks", "orderbooks"}
    for market in MARKETS:
        for kind in ("diff_orderbooks", "partial_orderbooks"):
            want = sum(1 for r in load(recorded, market, kind).to_pylist() if r["received_time"] >= start)
            assert sum(1 for m, k, _, t in got if (m, k) == (market, kind) and t >= start) == want, (market, kind)


def test_a_day_is_served_from_s3(recorded, tmp_path, s3):  # noqa: F811
    """--data s3://bucket/prefix (the test S3 server): the same day, the same symbols, and
    REST depth answers (before the clock starts) with a recorded snapshot, the earliest
    the recorded diffs join."""
    import requests

    from tests.test_upload import BUCKET, env_for
    day = day_of_recording(recorded)
    for f in recorded.rglob("*.parquet"):
        if not any(part.startswith(".") for part in f.relative_to(recorded).parts):
            s3["client"].upload_file(str(f), BUCKET, f"fleet/host1/{f.relative_to(recorded)}")
    rp = ReplayProcess(tmp_path, f"s3://{BUCKET}/fleet/host1", day, "--speed", "0", env=env_for(s3))
    try:
        ws_url, rest_url = rp.urls["futures"]
        info = requests.get(f"{rest_url}/fapi/v1/exchangeInfo", timeout=10).json()
        depth = requests.get(f"{rest_url}/fapi/v1/depth", params={"symbol": "BTCUSDT", "limit": 100}, timeout=10).json()
    finally:
        assert rp.stop() == 0
        rp.kill()
    assert sorted(s["symbol"] for s in info["symbols"]) == sorted(SYMBOLS["futures"])
    assert {s["status"] for s in info["symbols"]} == {"TRADING"}
    snapshots = {r["lastUpdateId"]: r for r in load(recorded, "futures", "orderbooks", symbol="BTCUSDT").to_pylist()}
    first = snapshots[depth["lastUpdateId"]]
    diff_starts = [r["first_update_id"] for r in sorted(load(recorded, "futures", "diff_orderbooks", symbol="BTCUSDT")
                                                        .to_pylist(), key=lambda r: r["received_time"])]
    assert first["lastUpdateId"] == min(i for i in snapshots if i >= diff_starts[0])
    assert (depth["E"], depth["T"]) == (
        first["event_time"] // 1000, first["transaction_time"] // 1000)  # stored in µs, served in ms as Binance does
    assert [float(p) for p, _ in depth["bids"]] == first["bid_prices"]
    diffs = sum(len(rows_of(recorded, m, "diff_orderbooks", day)) for m in MARKETS)
    assert diffs > 0 and f"diff_orderbooks={diffs}" in rp.log  # every row of the day was read from the bucket


def test_bad_input_is_refused(recorded, tmp_path):
    ports = ("--spot-port", "0", "--futures-port", "0")
    r = run_replay("--data", str(recorded), "--day", "2026-13-01", *ports)
    assert r.returncode == 2 and "not a day written YYYY-MM-DD" in r.stderr
    r = run_replay("--data", str(tmp_path / "nowhere"), "--day", "2026-01-01", *ports)
    assert r.returncode == 2 and "not a folder" in r.stderr
    r = run_replay("--data", "s3://bucket/prefix", "--day", "2026-01-01", *ports)  # no R2_* credentials
    assert r.returncode == 2 and "missing environment variable" in r.stderr and "Traceback" not in r.stderr
    r = run_replay("--data", str(recorded), "--day", "1999-01-01", *ports)
    assert r.returncode == 2 and "nothing recorded on 1999-01-01" in r.stderr
    r = run_replay("--data", str(recorded), "--day", "2026-01-01", "--speed", "-1", *ports)
    assert r.returncode == 2 and "--speed" in r.stderr
    day = day_of_recording(recorded)
    for args, says in ((("--from", "25:00"), "--from '25:00': a time of the day"),
                       (("--to", "12:61"), "--to '12:61': a time of the day"),
                       (("--from", "10:00", "--to", "09:59:59"), "--from 10:00 is not before --to 09:59:59"),
                       (("--symbols", " , "), "name at least one symbol"),
                       (("--symbols", "BTCUSDT,NOPEUSDT"), "not recorded on %s" % day),
                       (("--from", "00:00", "--to", "00:00:01"), "in the symbols and hours asked")):
        r = run_replay("--data", str(recorded), "--day", day, *args, *ports)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-500:])
    assert "NOPEUSDT" in run_replay("--data", str(recorded), "--day", day, "--symbols", "nopeusdt", *ports).stderr


VALUES = st.one_of(st.floats(min_value=-1e20, max_value=1e20, allow_nan=False, allow_infinity=False),
                   st.integers(0, 10**12).map(lambda n: n / 10**8), st.integers(0, 10**9).map(lambda n: n / 1000.0),
                   st.sampled_from([0.0, -0.0, 1e-8, 0.1, 2**52, 2**53 + 2.0, 12345678.12345678, 5e-324]))


@given(VALUES, st.integers(0, 20))
def test_a_number_reads_back_as_the_recorded_double(x, places):
    assert float(number(x, places)) == x


@given(st.lists(st.lists(st.tuples(VALUES, VALUES), max_size=6), max_size=6), st.data())
def test_levels_in_bulk_are_the_plain_levels(rows, data):
    """The replay's bulk formatting (levels_texts) writes what levels_text writes, row by
    row, for any values and any decimals per row (the fast path held to the plain one)."""
    import numpy as np
    import pyarrow as pa

    from serve.replay import levels_text, levels_texts
    places = [(data.draw(st.integers(0, 18)), data.draw(st.integers(0, 18))) for _ in rows]
    prices = pa.array([[p for p, _ in r] for r in rows], pa.list_(pa.float64()))
    sizes = pa.array([[q for _, q in r] for r in rows], pa.list_(pa.float64()))
    got = levels_texts(prices, sizes, np.array([p for p, _ in places], dtype=np.int64),
                       np.array([q for _, q in places], dtype=np.int64)).to_pylist()
    assert got == [levels_text([p for p, _ in r], [q for _, q in r], pp, sp) for r, (pp, sp) in zip(rows, places,
                                                                                                    strict=True)]


@given(st.integers(0, 10**15 - 1), st.integers(0, 8))
def test_a_number_comes_back_as_the_exchange_wrote_it(digits, places):
    """Text written with the symbol's decimals (≤ 15 significant digits, as Binance's are)
    comes back exactly: "0.35130000" is not "0.3513"."""
    text = f"{digits / 10**places:.{places}f}" if places else str(digits)
    x = float(text)
    assert number(x, places) == text
    assert decimals([x]) <= places
