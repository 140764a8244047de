"""Following the whole market: `all` and `top N` symbol sets, symbols listed and halted while
the collector runs, COIN-M, and snapshots kept within the weight budget at a few hundred
symbols. The real collector against the simulator, over sockets; what is checked is on
disk and in the log."""
from __future__ import annotations

import time

import orjson

from simulator import Simulator
from tests.faults import check_run, pause_and_stop
from tests.helpers import CollectorProcess, market_section, read_kind, run_to_exit, wait_until, write_config


def recorded_symbols(data_dir, market: str) -> set[str]:
    t = read_kind(data_dir, market, "diff_orderbooks")
    return set(t.column("symbol").to_pylist()) if t.num_rows else set()


def run_until(cfg, data_dir, market: str, want: set[str], timeout: float = 30.0) -> CollectorProcess:
    proc = CollectorProcess(cfg)
    try:
        wait_until(lambda: recorded_symbols(data_dir, market) >= want, timeout=timeout, interval=0.5)
        time.sleep(1.0)
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.log[-3000:]) from None
    return proc


def test_all_with_quote_filter_and_exclusions(tmp_path):
    symbols = ["BTCUSDT", "ETHUSDT", "ETHBTC", "SOLUSDC", "DOGEUSDT", "LUNAUSDT"]
    with Simulator(spot=dict(symbols=symbols, not_trading=("LUNAUSDT",))) as sim:
        section = market_section("spot", sim.spot, ["all"], quote_assets="USDT, USDC", symbols_exclude="DOGEUSDT")
        cfg = write_config(tmp_path, [section])
        proc = run_until(cfg, tmp_path / "data", "spot", {"BTCUSDT", "ETHUSDT", "SOLUSDC"})
        assert proc.stop() == 0, proc.log
    # ETHBTC is quoted in BTC, DOGEUSDT excluded, LUNAUSDT not trading
    assert recorded_symbols(tmp_path / "data", "spot") == {"BTCUSDT", "ETHUSDT", "SOLUSDC"}
    assert "[spot] symbols = all quoted in USDT,USDC: 3 symbols" in proc.log
    assert "ERROR" not in proc.log


def test_top_n_by_24h_quote_volume_usdm_and_coinm(tmp_path):
    """USD-M ranks by quoteVolume; COIN-M, whose ticker has none, by baseVolume x
    weightedAvgPrice."""
    usdm = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"]
    coinm = ["BTCUSD_PERP", "ETHUSD_PERP", "BTCUSD_261225"]
    with Simulator(futures=dict(symbols=usdm), delivery=dict(symbols=coinm)) as sim:
        sim.futures.volumes.update(BTCUSDT=9e9, ETHUSDT=5e9, SOLUSDT=1e9, XRPUSDT=2e9)
        sim.delivery.volumes.update({"BTCUSD_PERP": 3e9, "ETHUSD_PERP": 1e9, "BTCUSD_261225": 2e9})
        cfg = write_config(tmp_path, [market_section("futures", sim.futures, ["top 2"]),
                                      market_section("delivery", sim.delivery, ["top 2"])])
        proc = run_until(cfg, tmp_path / "data", "delivery", {"BTCUSD_PERP", "BTCUSD_261225"})
        wait_until(lambda: recorded_symbols(tmp_path / "data", "futures") >= {"BTCUSDT", "ETHUSDT"}, timeout=20)
        assert proc.stop() == 0, proc.log
    assert recorded_symbols(tmp_path / "data", "futures") == {"BTCUSDT", "ETHUSDT"}
    assert recorded_symbols(tmp_path / "data", "delivery") == {"BTCUSD_PERP", "BTCUSD_261225"}
    assert "[futures] symbols = top 2: 2 symbols" in proc.log
    # COIN-M's own payload fields are there on the wire (`ps`), and its files are futures-shaped
    diffs = read_kind(tmp_path / "data", "delivery", "diff_orderbooks").to_pylist()
    assert all(r["prev_final_update_id"] is not None and r["transaction_time"] is not None for r in diffs)
    assert (tmp_path / "data" / "delivery" / "orderbooks").is_dir()


def test_listing_and_halt_while_running(tmp_path):
    """A symbol that starts trading is recorded within listing_check + 30 s, on a batch with
    room (SUBSCRIBE) or on a new batch, without touching the other connections; a halted
    and a delisted one are dropped with a `gaps` row naming why; nothing is lost for the
    others."""
    check = 2
    with Simulator(spot=dict(symbols=["BTCUSDT", "ETHUSDT", "XRPUSDT"], record=True, updates_per_s=20)) as sim:
        m = sim.spot
        cfg = write_config(tmp_path, [market_section("spot", m, ["all"], listing_check=check, symbols_per_connection=2,
                                                     snapshot_interval=20, snapshot_limit=100, partial_levels=5)])
        data = tmp_path / "data"
        proc = run_until(cfg, data, "spot", {"BTCUSDT", "ETHUSDT", "XRPUSDT"})
        try:
            opened = m.connections_opened  # two batches (2 + 1 symbols) x 2 copies
            assert opened == 4
            listed_at = time.monotonic()
            sim.call(m.list_symbol("SOLUSDT"))  # batch 1 has room for one symbol: SUBSCRIBE there
            wait_until(lambda: "SOLUSDT" in recorded_symbols(data, "spot"), timeout=check + 30, interval=0.25)
            took = time.monotonic() - listed_at
            sim.call(m.list_symbol("ADAUSDT"))  # no room left: a new batch
            wait_until(lambda: "ADAUSDT" in recorded_symbols(data, "spot"), timeout=check + 30, interval=0.25)
            sim.call(m.halt_symbol("ETHUSDT", "BREAK"))
            sim.call(m.delist_symbol("XRPUSDT"))
            proc.wait_for_log("record ends market=spot symbol=XRPUSDT reason=delisted", timeout=check + 20)
            proc.wait_for_log("record ends market=spot symbol=ETHUSDT reason=halted", timeout=5)
            time.sleep(2)
            rc, = pause_and_stop(sim, proc)
        finally:
            proc.kill()
    assert rc == 0, proc.log[-3000:]
    log = proc.log
    print(f"listed symbol recorded after {took:.1f}s (listing_check {check}s)")
    assert "ERROR" not in log and "Traceback" not in log
    assert "subscribe conn=" in log and "unsubscribe conn=" in log
    # the first batch's connections were never touched: only the new batch's two were opened
    assert m.connections_opened == opened + 2
    gaps = read_kind(data, "spot", "gaps").to_pylist()
    reasons = {(g["symbol"], g["reason"]) for g in gaps}
    assert reasons == {("BTCUSDT", "start"), ("ETHUSDT", "start"), ("XRPUSDT", "start"), ("SOLUSDT", "start"),
                       ("ADAUSDT", "start"), ("ETHUSDT", "halted"), ("XRPUSDT", "delisted")}
    diffs = read_kind(data, "spot", "diff_orderbooks").to_pylist()
    for g in gaps:
        if g["reason"] in ("halted", "delisted"):
            last = max(r["final_update_id"] for r in diffs if r["symbol"] == g["symbol"])
            assert g["last_final_update_id"] == last and g["next_first_update_id"] is None
    # every diff the exchange delivered is on disk once; none is missing without a gaps row
    check_run(m, data)
    # the listed symbols joined from their first diff, each with a snapshot
    snaps = {r["symbol"] for r in read_kind(data, "spot", "orderbooks").to_pylist()}
    assert {"SOLUSDT", "ADAUSDT"} <= snaps
    assert took <= check + 30
    # verify reads a record's end as such: no unexplained break
    result = run_to_exit(cfg, "verify", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads(result.stdout)
    assert not any(s["unexplained_breaks"] for m in report for s in m["symbols"].values())


def test_snapshots_fit_the_weight_budget_at_a_few_hundred_symbols(tmp_path):
    """300 spot symbols at limit 1000 (weight 50) every 60 s would be 15,000 weight a minute;
    the exchange here allows 1,200 and the collector takes half: the interval stretches
    to 300 x 50 / 600 = 25 minutes, said in the log, and the limit is never passed, the
    start-up's 300 first snapshots included (they queue for the budget)."""
    symbols = [f"S{i:03d}USDT" for i in range(300)]
    with Simulator(spot=dict(symbols=symbols, updates_per_s=0.5, weight_limit=1200)) as sim:
        cfg = write_config(tmp_path, [market_section("spot", sim.spot, ["all"], snapshot_interval=60,
                                                     snapshot_limit=1000, partial_levels=5, partial_speed="1000ms")],
                           ws_redundancy=1, rest_weight_share=0.5)
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("recording market=spot symbols=300", timeout=30)
            wait_until(lambda: len(recorded_symbols(tmp_path / "data", "spot")) >= 250, timeout=40, interval=1)
            state = tmp_path / "data" / ".status.json"
            wait_until(state.exists, timeout=15)  # rewritten every 5 s
            status = orjson.loads(state.read_bytes())
            rc = proc.stop()
        finally:
            proc.kill()
    assert rc == 0, proc.log[-3000:]
    assert "snapshot interval stretched market=spot from 60s to 1500s" in proc.log
    assert max(sim.spot.weight_by_minute.values()) <= 600 + 20  # the share, plus exchangeInfo at start
    assert all(status == 200 for _, _, status in sim.spot.rest_log)
    assert status["markets"]["spot"]["symbols"] == 300


def test_top_n_changes_only_at_the_daily_ranking_but_admits_a_new_listing_at_once():
    """The listings thread's decisions, in-process against the simulator's REST (a clock
    injected for the UTC day): between rankings a volume change moves nothing, a new
    listing within the top N joins at once, a halt leaves; the next UTC day re-ranks."""
    import threading
    from dataclasses import replace

    import requests

    from config import MarketConfig
    from handlers.rest.listings import ListingWatcher
    from handlers.rest.snapshots import WeightBudget
    from markets import MARKETS

    day0 = 20_000 * 86400.0 + 3600  # some UTC day, 01:00
    now = [day0]
    changes: list = []
    recorded = ["AUSDT", "BUSDT"]

    def change(added: list, removed: list) -> None:  # what the pipeline does with the set
        changes.append((added, removed))
        recorded[:] = [s for s in recorded if s not in {s for s, _ in removed}] + added

    with Simulator(futures=dict(symbols=["AUSDT", "BUSDT", "CUSDT", "DUSDT"])) as sim:
        f = sim.futures
        f.volumes.update(AUSDT=4e9, BUSDT=3e9, CUSDT=2e9, DUSDT=1e9)
        cfg = MarketConfig(market=MARKETS["futures"], symbols=(), ws_url=f.ws_url, rest_url=f.rest_url,
                           diff_speed="100ms", partial_levels=5, partial_speed="100ms", snapshot_interval=60,
                           snapshot_limit=100, symbols_per_connection=10, selection="top", top_n=2,
                           listing_check=60)
        cfg = replace(cfg, symbols=tuple(recorded))
        w = ListingWatcher(cfg, lambda: recorded, {"AUSDT", "BUSDT", "CUSDT", "DUSDT"}, requests.Session(),
                           WeightBudget(2400, 0.5), threading.Event(), change, clock=lambda: now[0])
        f.volumes.update(CUSDT=9e9)  # C now ranks first, but the day's ranking stands
        w.check()
        assert changes == []
        sim.call(f.list_symbol("EUSDT"))
        f.volumes.update(EUSDT=8e9)  # a new listing within the top 2: joins now
        sim.call(f.list_symbol("FUSDT"))  # a new listing outside it: does not
        w.check()
        assert changes == [(["EUSDT"], [])]
        sim.call(f.halt_symbol("AUSDT"))
        w.check()
        assert changes[-1] == ([], [("AUSDT", "halted")])
        now[0] += 86400  # the next UTC day: ranked again (C and E lead; B leaves)
        w.check()
        assert changes[-1] == (["CUSDT"], [("BUSDT", "unranked")])
        assert sorted(recorded) == ["CUSDT", "EUSDT"]
