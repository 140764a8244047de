"""The quality record (storage/quality.py): one row per day and symbol, written when a day is
compacted and by merge, uploaded with the day, checked by verify.

Recordings come from the real collector against the simulator; the expected seconds are
computed here another way (plain Python over the rows on disk, with the simulator's own log
of the events it dropped), and compared with the record to the microsecond."""
from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from simulator import Simulator
from storage.compact import compact_all
from storage.files import US_PER_DAY, day_start_us
from storage.merge import merge, open_source
from storage.quality import quality_file
from storage.schemas import QUALITY
from tests.faults import both_markets, pause_and_stop
from tests.helpers import CollectorProcess, market_section, run_to_exit, wait_until, write_config

FAR = 4_000_000_000_000_000  # "now" for compaction: every recorded day is finished
DOCS = Path(__file__).resolve().parent.parent / "docs" / "data.md"


def whole_days_query(data: Path) -> int:
    """Rows the DuckDB query of docs/data.md ("Only whole days") returns, run in `data`'s parent."""
    import os

    import duckdb

    text = DOCS.read_text()
    sql = text[text.index("```sql", text.index("Only whole days")) + 6:]
    sql = sql[:sql.index("```")]
    cwd = os.getcwd()
    os.chdir(data.parent)
    try:
        return len(duckdb.sql(sql).fetchall())
    finally:
        os.chdir(cwd)


@pytest.fixture(autouse=True)
def one_utc_day():
    """These recordings last under two minutes and are checked as one UTC day's record:
    started within two minutes of midnight, a test waits for the new day first."""
    left = US_PER_DAY - time.time_ns() // 1000 % US_PER_DAY
    if left < 120_000_000:
        time.sleep(left / 1e6 + 1)


def compacted(data: Path) -> None:
    compact_all(data, 3, FAR)


def rows(data: Path, market: str, kind: str, day: str) -> list[dict]:
    path = data / market / kind / f"{day}.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else []


def the_day(data: Path, market: str) -> str:
    return sorted(p.stem for p in (data / market / "diff_orderbooks").glob("*.parquet"))[-1]


def expected_quality(data: Path, market: str, day: str, chains_by_pu: bool) -> dict[str, dict]:
    """The record's seconds and counts, computed row by row from the day files."""
    end = day_start_us(day) + US_PER_DAY
    diffs, snaps = rows(data, market, "diff_orderbooks", day), rows(data, market, "orderbooks", day)
    gaps = sorted(rows(data, market, "gaps", day), key=lambda g: g["detected_time"])
    out = {}
    for symbol in sorted({d["symbol"] for d in diffs}):
        mine = sorted((d for d in diffs if d["symbol"] == symbol), key=lambda d: d["received_time"])
        my_snaps = sorted((s for s in snaps if s["symbol"] == symbol), key=lambda s: s["received_time"])
        my_gaps = [g for g in gaps if g["symbol"] == symbol]
        assert my_gaps[0]["reason"] == "start"  # these recordings start on the day
        rec_start = min(d["received_time"] for d in mine if d["received_time"] >= my_gaps[0]["detected_time"])
        ended = [g for g in my_gaps if g["next_first_update_id"] is None]
        rec_end = max(d["received_time"] for d in mine if d["final_update_id"] == ended[0]["last_final_update_id"]) \
            if ended else end
        holes = []
        for g in my_gaps:
            if g["reason"] == "start" or g["next_first_update_id"] is None:
                continue
            t0 = max(d["received_time"] for d in mine if d["final_update_id"] == g["last_final_update_id"])
            need = g["next_first_update_id"] - (0 if chains_by_pu else 1)
            snap = next(s for s in my_snaps if s["received_time"] >= g["detected_time"] and s["lastUpdateId"] >= need)
            t1 = min(d["received_time"] for d in mine if d["received_time"] >= snap["received_time"] and (
                d["final_update_id"] >= snap["lastUpdateId"] if chains_by_pu else d["final_update_id"] > snap["lastUpdateId"]))
            holes.append((t0, t1))
        uncovered, reach = 0, None
        for a, b in sorted(holes):
            a, b = max(a, rec_start), min(b, rec_end)
            if reach is not None:
                a = max(a, reach)
            if b > a:
                uncovered += b - a
                reach = b
        out[symbol] = {"recorded_seconds": (rec_end - rec_start) / 1e6,
                       "covered_seconds": (rec_end - rec_start - uncovered) / 1e6,
                       "diffs": len(mine), "snapshots": len(my_snaps),
                       "gaps_sequence": sum(g["reason"] == "sequence" for g in my_gaps),
                       "gaps_reconnect": sum(g["reason"] == "reconnect" for g in my_gaps),
                       "first_received_time": mine[0]["received_time"], "last_received_time": mine[-1]["received_time"]}
    return out


def assert_matches(record: list[dict], expected: dict[str, dict]) -> None:
    by_symbol = {r["symbol"]: r for r in record}
    assert set(by_symbol) == set(expected)
    for symbol, want in expected.items():
        got = by_symbol[symbol]
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-6) if isinstance(v, float) else got[k] == v, (symbol, k, got[k], v)
        assert got["coverage"] == pytest.approx(got["covered_seconds"] / got["recorded_seconds"])


def test_a_clean_recording_is_whole_and_its_record_matches_the_files(tmp_path):
    """Both markets, nothing wrong: every symbol's coverage is 1, its counts are the day
    files', its record runs from its first diff to 24:00 (it goes on into the next day); the
    record is in the Parquet schema, and verify prints it, returns it, and agrees."""
    symbols = ["BTCUSDT", "ETHUSDT"]
    with both_markets(tmp_path, symbols) as (sim, proc):
        wait_until(lambda: all(m.frames_sent > 200 for m in sim.markets()), timeout=30)
        for market in ("spot", "futures"):  # today's running coverage, in the status line
            proc.wait_for_log(f"status market={market} ", timeout=10)
            assert re.findall(rf"status market={market} .* coverage=([\d.]+)", proc.log)[-1] == "1.000000"
    data = tmp_path / "data"
    compacted(data)
    for market, by_pu in (("spot", False), ("futures", True)):
        day = the_day(data, market)
        # the diffs the exchange sent to one of the two connections only (the first copy
        # connects before the second)
        sim_market = getattr(sim, market)
        conns_of: dict[tuple[str, int], set[int]] = {}
        for sent in sim_market.sent:
            if "@depth@" in sent.stream:
                msg = json.loads(sent.data)
                conns_of.setdefault((msg["s"], msg["u"]), set()).add(sent.conn)
        assert not (data / market / "quality" / day).exists()  # the delivery counts are folded in
        path = quality_file(data / market, day)
        assert pq.read_schema(path).remove_metadata() == QUALITY.remove_metadata()
        record = pq.read_table(path).to_pylist()
        assert [r["symbol"] for r in record] == symbols and all(r["day"] == day for r in record)
        assert all(r["coverage"] == 1.0 and r["covered_seconds"] == r["recorded_seconds"] for r in record)
        partials = rows(data, market, "partial_orderbooks", day)
        for r in record:
            assert r["partials"] == sum(p["symbol"] == r["symbol"] for p in partials) > 0
            assert r["gaps_sequence"] == r["gaps_reconnect"] == r["gaps_other"] == r["restarts"] == 0
            assert r["missing_update_ids"] == (None if by_pu else 0)
            assert r["recorded_seconds"] == pytest.approx((day_start_us(day) + US_PER_DAY - r["first_received_time"]) / 1e6)
            assert r["connections_lost"] == 0
            kept = [d["final_update_id"] for d in rows(data, market, "diff_orderbooks", day) if d["symbol"] == r["symbol"]]
            assert r["diffs_from_one_copy"] == sum(len(conns_of[(r["symbol"], u)]) == 1 for u in kept) < len(kept)
        assert_matches(record, expected_quality(data, market, day, by_pu))
    # the documented query keeps every diff of a whole day
    assert whole_days_query(data) == len(rows(data, "spot", "diff_orderbooks", the_day(data, "spot"))) > 0
    cfg = tmp_path / "config.ini"
    out = run_to_exit(cfg, "verify", "--json", "--day", the_day(data, "spot"))
    assert out.returncode == 0, out.stdout + out.stderr
    reports = json.loads(out.stdout)
    assert [len(r["quality"]) for r in reports] == [2, 2]
    text = run_to_exit(cfg, "verify", "--day", the_day(data, "spot")).stdout
    assert "quality: 2 symbols, every one whole (coverage 1)" in text


def test_drops_and_a_halt_are_counted_to_the_microsecond(tmp_path):
    """Redundancy 1; diffs of one symbol dropped twice (each a sequence gap, answered by a
    snapshot), the connection cut (a reconnect gap of every symbol), then another symbol
    halted and one delisted (their records end). The record's seconds are the ones computed row by row here;
    the ids it says are missing, the events of the simulator's log not on disk; the cut is
    one connection lost for every symbol it carried; the report draws the coverage and
    lists the worst symbols first; a tampered day file makes verify report the
    disagreement."""
    with Simulator(spot=dict(symbols=["BTCUSDT", "ETHUSDT", "XRPUSDT", "BNBUSDT"], record=True,
                             updates_per_s=40)) as sim:
        m = sim.spot
        cfg = write_config(tmp_path, [market_section("spot", m, ["all"], listing_check=1, snapshot_interval=30,
                                                     snapshot_limit=100, partial_levels=5)], ws_redundancy=1)
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("recording market=spot")
            wait_until(lambda: m.frames_sent > 200, timeout=30)
            for _ in range(2):
                m.faults.drop_symbol, m.faults.drop_diffs = "BTCUSDT", 3
                time.sleep(3)  # the gap is seen at the next diff, and a snapshot answers it at once
            assert sim.call(m.cut_connection(m.live_conns()[0], abrupt=True))  # a connection lost
            proc.wait_for_log("connection lost conn=1", timeout=10)
            wait_until(lambda: len(m.live_conns()) == 1, timeout=20)
            time.sleep(2)
            # today's coverage so far: below 1 in `status` and in the metrics, as the day's record will be
            status = run_to_exit(cfg, "status")
            running = float(re.search(r"coverage today ([\d.]+)", status.stdout).group(1))
            assert 0.5 < running < 1.0, status.stdout
            port = int(re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", proc.log).group(1))
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            assert 0.5 < float(re.search(r'obc_coverage_ratio\{market="spot"\} ([\d.e-]+)', text).group(1)) < 1.0
            sim.call(m.halt_symbol("XRPUSDT", "BREAK"))
            proc.wait_for_log("record ends market=spot symbol=XRPUSDT reason=halted", timeout=20)
            sim.call(m.delist_symbol("BNBUSDT"))
            proc.wait_for_log("record ends market=spot symbol=BNBUSDT reason=delisted", timeout=20)
            time.sleep(1)
            rc, = pause_and_stop(sim, proc)
        finally:
            proc.kill()
    assert rc == 0, proc.log[-3000:]
    data = tmp_path / "data"
    compacted(data)
    day = the_day(data, "spot")
    record = {r["symbol"]: r for r in pq.read_table(quality_file(data / "spot", day)).to_pylist()}
    assert_matches(list(record.values()), expected_quality(data, "spot", day, False))
    btc = record["BTCUSDT"]
    assert btc["coverage"] < 1.0
    # the ids the record says are missing: every event the exchange made of the symbol
    # within its record that is not on disk (the dropped ones, and those sent while the
    # connection was down)
    dropped = [(U, u) for s, U, u in m.dropped if s == "BTCUSDT"]
    on_disk = {d["final_update_id"] for d in rows(data, "spot", "diff_orderbooks", day) if d["symbol"] == "BTCUSDT"}
    missing = [(U, u) for s, U, u, _ in m.emitted if s == "BTCUSDT" and min(on_disk) < u < max(on_disk) and u not in on_disk]
    assert len(dropped) == 6 and set(dropped) <= set(missing)
    assert btc["missing_update_ids"] == sum(u - U + 1 for U, u in missing)
    assert btc["gaps_sequence"] == 2  # (a reconnect gap too, if the symbol moved while the connection was down)
    for ended in ("XRPUSDT", "BNBUSDT"):  # their records ended at their last diff (halted, delisted)
        assert record[ended]["recorded_seconds"] < 60
    assert record["XRPUSDT"]["last_received_time"] < record["BNBUSDT"]["last_received_time"]
    assert all(r["connections_lost"] == 1 for r in record.values())
    assert all(r["diffs_from_one_copy"] == r["diffs"] for r in record.values())  # redundancy 1
    whole = {s for s, r in record.items() if r["coverage"] == 1.0}  # BTCUSDT is not (its drops); others as the cut fell
    assert "BTCUSDT" not in whole
    assert whole_days_query(data) == sum(r["diffs"] for s, r in record.items() if s in whole)
    # report: the coverage by hour, and the worst symbols first
    out = run_to_exit(cfg, "report", "--day", day, "--market", "spot", "--out", str(tmp_path / "report"), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "report" / f"report-spot-{day}-coverage.png").stat().st_size > 1000
    lines = out.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"coverage: {len(whole)} of 4 symbols whole"))
    listed = [line.split()[0] for line in lines[at + 1:at + 1 + 4 - len(whole)]]
    assert sorted(listed, key=lambda s: record[s]["coverage"]) == listed and set(listed) == set(record) - whole
    # a day file changed after the record was written: verify says they disagree
    diffs = pq.read_table(data / "spot" / "diff_orderbooks" / f"{day}.parquet")
    pq.write_table(diffs.slice(0, diffs.num_rows - 5), data / "spot" / "diff_orderbooks" / f"{day}.parquet")
    out = run_to_exit(cfg, "verify", "--json", "--day", day, "--market", "spot")
    assert out.returncode == 1
    problems = json.loads(out.stdout)[0]["problems"]
    assert any("the quality record disagrees with the data" in p and " diffs " in f" {p}" for p in problems), problems


def test_merge_of_two_hosts_has_the_merged_coverage(tmp_path):
    """Two hosts record the same symbols; one misses diffs (a gap the other covers). Each
    host's record shows its own hole; the merge's record, computed from the merged files,
    is whole."""
    symbols = ["BTCUSDT", "ETHUSDT"]
    with Simulator(spot=dict(symbols=symbols, record=True, updates_per_s=40)) as sim:
        m = sim.spot
        procs = []
        for host in ("a", "b"):
            (tmp_path / host).mkdir()
            cfg = write_config(tmp_path / host, [market_section("spot", m, symbols, snapshot_interval=30,
                                                                snapshot_limit=100, partial_levels=5)], ws_redundancy=1)
            procs.append(CollectorProcess(cfg))
        try:
            for p in procs:
                p.wait_for_log("recording market=spot")
            wait_until(lambda: m.frames_sent > 200, timeout=30)
            time.sleep(1)
            # one host's connection misses the diffs of 0.6 s that the other one gets
            first = m.live_conns()[0]
            assert sim.call(m.stall_connection(first))
            time.sleep(0.6)
            assert sim.call(m.stall_connection(first, False))
            time.sleep(3)
            rcs = pause_and_stop(sim, *procs)
        finally:
            for p in procs:
                p.kill()
    assert rcs == [0, 0]
    for host in ("a", "b"):
        compacted(tmp_path / host / "data")
    day = the_day(tmp_path / "a" / "data", "spot")
    own = {h: {r["symbol"]: r for r in pq.read_table(quality_file(tmp_path / h / "data" / "spot", day)).to_pylist()}
           for h in ("a", "b")}
    merged = tmp_path / "merged"
    merge([open_source(str(tmp_path / h / "data")) for h in ("a", "b")], merged, day=day, markets=("spot",))
    record = {r["symbol"]: r for r in pq.read_table(quality_file(merged / "spot", day)).to_pylist()}
    assert_matches(list(record.values()), expected_quality(merged, "spot", day, False))
    for symbol in symbols:
        assert record[symbol]["connections_lost"] is None and record[symbol]["diffs_from_one_copy"] is None
        assert record[symbol]["coverage"] >= max(own["a"][symbol]["coverage"], own["b"][symbol]["coverage"])
        assert record[symbol]["diffs"] >= max(own["a"][symbol]["diffs"], own["b"][symbol]["diffs"])


def test_the_running_coverage_follows_the_records_rule():
    """Today's coverage as the processor counts it: holes open at a break and close at the
    snapshot that reaches past the missing ids (not one that falls short); a record's end
    stops its clock; a new day starts the count again at 00:00, open holes carried over."""
    from handlers.process.coverage import RunningCoverage

    day = day_start_us("2026-12-01")
    c = RunningCoverage()
    assert c.ratio(day + 1) is None
    c.started("A", day + 0)
    c.started("B", day + 0)
    assert c.ratio(day + 100) == 1.0
    c.broke("A", day + 100, needed_id=50)
    c.snapshot("A", day + 150, last_update_id=49)  # short of the missing ids: the hole stays open
    assert c.ratio(day + 200) == pytest.approx(1 - 100 / 400)
    c.snapshot("A", day + 200, last_update_id=50)
    assert c.ratio(day + 300) == pytest.approx(1 - 100 / 600)
    c.ended("B", day + 300)
    assert c.ratio(day + 400) == pytest.approx(1 - 100 / 700)
    c.broke("A", day + US_PER_DAY - 10, needed_id=60)
    c.started("C", day + US_PER_DAY + 10)  # the next day: A's open hole counts from 00:00
    assert c.ratio(day + US_PER_DAY + 20) == pytest.approx(1 - 20 / (20 + 10))
