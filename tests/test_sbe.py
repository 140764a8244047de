"""Spot SBE (`feed = sbe`): the decoder against an independent SBE implementation (the
`sbe` package) on random messages, a frame checked byte by byte, the refusals; then the
real collector recording the simulator's binary streams exactly, the API key sent and
never written anywhere, and refused at start when missing."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sbe as sbe_oracle
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.process import sbe
from serve import sbe as sbe_frames
from simulator import Simulator
from tests.helpers import ROOT, CollectorProcess, market_section, read_kind, run_to_exit, wait_until, write_config
from tests.test_replay import ReplayProcess, day_of_recording, rows_of

SCHEMA = sbe_oracle.Schema.parse(open(ROOT / "serve" / "sbe_stream.xml"))
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
KEY = "test-ed25519-key-Zq7Xv2"

levels = st.lists(st.tuples(st.integers(-2**62, 2**62), st.integers(0, 2**62)), max_size=30)
exponents = st.integers(-18, 4)
symbols = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=20)


def as_value(mantissa: int, exponent: int) -> float:
    return float(mantissa * 10**exponent) if exponent >= 0 else mantissa / 10**-exponent


@settings(max_examples=300, deadline=None)
@given(t=st.integers(0, 2**62), first=st.integers(0, 2**62), last=st.integers(0, 2**62), pe=exponents, qe=exponents,
       bids=levels, asks=levels, symbol=symbols, diff=st.booleans())
def test_the_decoder_reads_what_an_independent_sbe_implementation_reads(t, first, last, pe, qe, bids, asks, symbol, diff):
    frame = (sbe_frames.diff(t, first, last, pe, qe, bids, asks, symbol) if diff
             else sbe_frames.depth(t, last, pe, qe, bids, asks, symbol))
    oracle = SCHEMA.decode(frame).value
    template, (event, name, U, u, pu, T, b, a) = sbe.decode(frame)
    assert template == (sbe.DIFF if diff else sbe.PARTIAL)
    assert event == oracle["eventTime"] and name == symbol and len(symbol) == oracle["symbol"]["length"]
    assert (U, u) == ((oracle["firstBookUpdateId"], oracle["lastBookUpdateId"]) if diff else (None, oracle["bookUpdateId"]))
    assert pu is None and T is None
    for got, side in ((b, oracle["bids"]), (a, oracle["asks"])):
        assert [(float(p), float(q)) for p, q in got] == [
            (as_value(x["price"], oracle["priceExponent"]), as_value(x["qty"], oracle["qtyExponent"])) for x in side]


@settings(max_examples=100, deadline=None)
@given(bids=levels, asks=levels, extra=st.binary(max_size=40), block=st.integers(16, 48), version=st.integers(0, 5))
def test_fields_a_newer_schema_version_adds_are_skipped(bids, asks, extra, block, version):
    plain = sbe_frames.diff(1, 2, 3, -8, -8, bids, asks, "BTCUSDT")
    grown = sbe_frames.diff(1, 2, 3, -8, -8, bids, asks, "BTCUSDT", extra_root=extra, block=block, version=version)
    assert sbe.decode(grown) == sbe.decode(plain)


def test_a_frame_checked_byte_by_byte():
    """A diff of BTCUSDT at 1796516000123456 µs, ids 10..12, one bid 123.45 x 1.00000000 (the
    decoder's docstring writes it out)."""
    frame = bytes.fromhex("1a00 1327 0100 0000 404a05faeb610600 0a00000000000000 0c00000000000000 fe f8"
                          "1000 0100 3930000000000000 00e1f50500000000 1000 0000 07 42544355534454")
    assert sbe.decode(frame) == (10003, (1796516000123456, "BTCUSDT", 10, 12, None, None,
                                         [["123.45", "1.00000000"]], []))


@pytest.mark.parametrize("frame, why", [
    (struct.pack("<HHHH", 26, 10003, 2, 0) + bytes(40), "schema id 2"),
    (struct.pack("<HHHH", 18, 10000, 1, 0) + bytes(40), "template 10000"),
    (sbe_frames.diff(1, 2, 3, -2, -2, [(1, 1)], [(2, 2)], "BTCUSDT")[:-3], "symbol runs past"),
    (sbe_frames.diff(1, 2, 3, -2, -2, [(1, 1)] * 3, [], "BTCUSDT")[:40], "past the frame"),
    (b"\x01", "cut short"),
])
def test_what_does_not_decode_is_refused(frame, why):
    with pytest.raises(sbe.SbeError, match=why):
        sbe.decode(frame)


def test_decimal_text_is_exact():
    assert [sbe.decimal_text(m, e) for m, e in ((12345, -2), (5, -3), (-5, -1), (7, 2), (0, -2), (10**18, -18))] == [
        "123.45", "0.005", "-0.5", "700", "0.00", "1.000000000000000000"]


def values(message: dict, side: str) -> tuple:
    pe, qe = message["priceExponent"], message["qtyExponent"]
    return tuple((as_value(x["price"], pe), as_value(x["qty"], qe)) for x in message[side])


def sbe_config(tmp_path: Path, sim) -> Path:
    return write_config(tmp_path, [market_section("spot", sim.spot, SYMBOLS, snapshot_interval=3, snapshot_limit=100,
                                                  feed="sbe")])


def test_the_binary_streams_are_recorded_exactly_and_the_key_is_never_written(tmp_path):
    with Simulator(spot=dict(symbols=SYMBOLS, record=True, updates_per_s=60, feed="sbe")) as sim:
        cfg = sbe_config(tmp_path, sim)
        proc = CollectorProcess(cfg, env={"BINANCE_API_KEY": KEY})
        try:
            proc.wait_for_log("recording market=spot")
            wait_until(lambda: sim.spot.frames_sent > 600, timeout=30)
            sim.spot.faults.paused = True
            time.sleep(1.5)
            rc = proc.stop()
        finally:
            proc.kill()
    assert rc == 0, proc.log
    assert sim.spot.api_keys_seen == {KEY}
    assert {s.name for s in sim.spot.streams.values()} == {f"{s.lower()}@depth{n}" for s in SYMBOLS for n in ("", "20")}
    expected: dict[str, Counter] = {"diff_orderbooks": Counter(), "partial_orderbooks": Counter()}
    first_conn: dict = {}
    for sent in sim.spot.sent:  # each frame once: the copy of the connection that delivered it first
        m = SCHEMA.decode(sent.data).value
        diff = "lastBookUpdateId" in m
        u = m["lastBookUpdateId"] if diff else m["bookUpdateId"]
        key = (sent.stream, u)
        if first_conn.setdefault(key, sent.conn) != sent.conn:
            continue
        row = (sent.stream.split("@")[0].upper(), m["eventTime"], m.get("firstBookUpdateId"), u,
               values(m, "bids"), values(m, "asks"))
        expected["diff_orderbooks" if diff else "partial_orderbooks"][row] += 1
    data = tmp_path / "data"
    for kind, want in expected.items():
        t = read_kind(data, "spot", kind).to_pylist()
        got = Counter((r["symbol"], r["event_time"], r["first_update_id"], r["final_update_id"],
                       tuple(zip(r["bid_prices"], r["bid_sizes"], strict=True)),
                       tuple(zip(r["ask_prices"], r["ask_sizes"], strict=True))) for r in t)
        assert sum(want.values()) > 50 and got == want, kind
        assert all(r["prev_final_update_id"] is None and r["transaction_time"] is None for r in t)
    gaps = read_kind(data, "spot", "gaps")
    assert sorted(gaps.column("reason").to_pylist()) == ["start"] * len(SYMBOLS)
    # the secret: in no log line and no file the collector wrote
    assert KEY not in proc.log
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_feed_sbe_without_a_key_is_refused_at_start(tmp_path):
    with Simulator(spot=dict(symbols=SYMBOLS, feed="sbe")) as sim:
        cfg = sbe_config(tmp_path, sim)
        env = {k: v for k, v in os.environ.items() if k != "BINANCE_API_KEY"}
        done = subprocess.run([sys.executable, str(ROOT / "collector.py"), "--config", str(cfg)], capture_output=True,
                              text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "BINANCE_API_KEY" in line]
    assert len(errors) == 1 and "feed = sbe" in errors[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("section, key", [("spot", "diff_speed = 1000ms"), ("spot", "partial_levels = 5"),
                                          ("futures", "feed = sbe")])
def test_sbe_settings_that_cannot_apply_are_refused(tmp_path, section, key):
    path = tmp_path / "config.ini"
    feed = "feed = sbe\n" if section == "spot" else ""
    path.write_text(f"[collector]\ndata_dir = data\n[{section}]\nsymbols = BTCUSDT\n{feed}{key}\n")
    done = run_to_exit(path, "check-config")
    assert done.returncode == 2 and f"[{section}]" in done.stderr and key.split(" = ")[0] in done.stderr, done.stderr


def test_a_refused_key_is_an_error_line_with_backoff_not_a_retry_storm(tmp_path):
    with Simulator(spot=dict(symbols=SYMBOLS, feed="sbe")) as sim:
        sim.spot.api_keys = {"another-key"}
        proc = CollectorProcess(sbe_config(tmp_path, sim), env={"BINANCE_API_KEY": KEY})
        try:
            proc.wait_for_log("recording market=spot")
            time.sleep(6)
        finally:
            proc.stop()
            proc.kill()
    refused = [line for line in proc.log.splitlines() if "refused the API key" in line]
    assert refused and all(" ERROR " in line and "BINANCE_API_KEY" in line for line in refused)
    # two copies, each backing off (0.5 s, 1 s, 2 s, ... jittered): a handful of attempts, not hundreds
    assert len(refused) <= 16, len(refused)
    assert KEY not in proc.log and not sim.spot.api_keys_seen


def test_an_sbe_day_replayed_as_sbe_is_recorded_again_row_for_row(tmp_path):
    """record (sbe) -> replay --spot-sbe-port -> record (sbe): the same diff and depth20 rows
    (every column but received_time), as the JSON round trip gives."""
    (tmp_path / "first").mkdir()
    with Simulator(spot=dict(symbols=SYMBOLS, updates_per_s=40, feed="sbe")) as sim:
        proc = CollectorProcess(sbe_config(tmp_path / "first", sim), env={"BINANCE_API_KEY": KEY})
        try:
            proc.wait_for_log("recording market=spot")
            wait_until(lambda: sim.spot.frames_sent > 400, timeout=30)
            sim.spot.faults.paused = True
            time.sleep(1.5)
            assert proc.stop() == 0, proc.log
        finally:
            proc.kill()
    original = tmp_path / "first" / "data"
    day = day_of_recording(original)
    rp = ReplayProcess(tmp_path / "replay", original, day, "--speed", "0", "--start-delay", "4",
                       "--spot-sbe-port", "0", markets=["spot", "futures"])
    try:
        rp.wait_for_log("replay market=spot-sbe ")
        line = next(x for x in rp.log.splitlines() if "replay market=spot-sbe " in x)
        words = dict(w.split("=", 1) for w in line.split() if "=" in w)
        urls = type("Urls", (), {"ws_url": words["ws_url"], "rest_url": words["rest_url"]})
        (tmp_path / "again").mkdir()
        cfg = write_config(tmp_path / "again", [market_section("spot", urls, SYMBOLS, snapshot_interval=600, feed="sbe")])
        proc = CollectorProcess(cfg, env={"BINANCE_API_KEY": "any-key"})
        try:
            rp.wait_for_log("done:", timeout=120)
            time.sleep(1.5)
            assert proc.stop() == 0, proc.log[-3000:]
        finally:
            proc.kill()
        assert rp.stop() == 0, rp.log[-3000:]
    finally:
        rp.kill()
    again = tmp_path / "again" / "data"
    for kind in ("diff_orderbooks", "partial_orderbooks"):
        before, after = rows_of(original, "spot", kind, day), rows_of(again, "spot", kind)
        assert len(before) > 50 and after == before, kind


def test_an_sbe_message_counts_as_data_for_liveness_and_junk_does_not():
    from handlers.ingest.websocket import is_data

    assert is_data(sbe_frames.diff(1, 2, 3, -2, -2, [(1, 1)], [], "BTCUSDT"))
    assert is_data(sbe_frames.depth(1, 2, -2, -2, [], [], "BTCUSDT"))
    assert is_data(b'{"stream":"btcusdt@depth@100ms","data":{}}')
    for not_data in (b'{"result":null,"id":1}', b'{"stream":"!serverShutdown","data":{}}', b"this is not json",
                     b"\xff\xfe\x00 binary junk"):
        assert not is_data(not_data), not_data


def test_sbe_frames_left_in_the_journal_are_recovered_into_rows(tmp_path):
    """A crash leaves SBE frames in the journal: the next start turns them into the rows
    they would have been (the same decoder, continuity as live)."""
    import config
    from handlers.process.recovery import recover
    from storage.journal import Journal, journal_dir

    path = tmp_path / "config.ini"
    path.write_text("[collector]\ndata_dir = data\n[spot]\nsymbols = BTCUSDT\nfeed = sbe\n")
    cfg = config.load(path)
    data = cfg.collector.data_dir
    journal = Journal(journal_dir(data, "spot"), run_id=1)
    t = 1796516000000000
    frames = [sbe_frames.diff(t + 20_000 * k, 100 + 2 * k, 101 + 2 * k, -2, -8, [(12345 + k, 10**8)], [], "BTCUSDT")
              for k in range(50)]
    frames.append(sbe_frames.depth(t + 1_000_000, 199, -2, -8, [(12345, 10**8)] * 20, [(12350, 10**8)] * 20,
                                   "BTCUSDT"))
    for k in range(0, len(frames), 10):
        journal.add_ws(t + 20_000 * k, 1, frames[k:k + 10])
    journal.sync(force=True)  # then the crash: no part file was written
    written = recover(cfg.markets[0], data, 3, lambda: t + 2_000_000)
    assert written == {"diff_orderbooks": 50, "partial_orderbooks": 1, "gaps": 1}
    diffs = read_kind(data, "spot", "diff_orderbooks").sort_by("final_update_id").to_pylist()
    assert [r["final_update_id"] for r in diffs] == [101 + 2 * k for k in range(50)]
    assert diffs[3]["event_time"] == t + 60_000 and diffs[3]["bid_prices"] == [123.48]
    assert read_kind(data, "spot", "partial_orderbooks").to_pylist()[0]["ask_prices"] == [123.5] * 20
