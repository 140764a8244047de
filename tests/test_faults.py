"""Fault injection: the real collector against a misbehaving simulator, each fault on
its own and all together, judged from the files on disk (tests/faults.py). The faults hit
every connection at once; each fault on its own runs at `ws_redundancy = 1` (one
connection per batch, so that what it costs is seen), the all-faults soak at the default
redundancy of 2. Faults on single connections: tests/test_redundancy.py."""
from __future__ import annotations

import os
import random
import time

import pytest

from tests.faults import both_markets, check_run
from tests.helpers import wait_until

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT"]


def run_faulty(tmp_path, fault, seconds: float = 6.0, sim_kw=None, collector_kw=None, after=None,
               redundancy: int = 1):
    """Start both markets, let them settle, apply `fault(sim)`, run `seconds`, let
    `after(sim)` undo it, settle, pause the simulator, SIGTERM; returns (sim, proc)."""
    with both_markets(tmp_path, SYMBOLS, sim_kw, ws_dead_after=3, ws_redundancy=redundancy,
                      **(collector_kw or {})) as (sim, proc):
        wait_until(lambda: all(m.frames_sent > 50 for m in sim.markets()), timeout=20)
        fault(sim)
        time.sleep(seconds)
        if after:
            after(sim)
        time.sleep(3)
    return sim, proc


def each(sim, fn):
    for m in sim.markets():
        fn(m)


def test_dropped_diffs_become_gaps_with_snapshots(tmp_path):
    sim, proc = run_faulty(tmp_path, lambda s: each(s, lambda m: setattr(m.faults, "drop_diffs", 3)))
    for m in sim.markets():
        assert len(m.dropped) == 3
        seen = check_run(m, tmp_path / "data")
        assert seen["gaps"].get("sequence", 0) >= 1, seen
        assert seen["not_recorded"] >= 3


def test_duplicated_frames_written_once(tmp_path):
    sim, proc = run_faulty(tmp_path, lambda s: each(s, lambda m: setattr(m.faults, "duplicate_frames", 30)))
    for m in sim.markets():
        assert m.faults.duplicate_frames == 0
        seen = check_run(m, tmp_path / "data", allow_gaps=False)
        assert seen["delivered"] > 0
    assert "duplicates=" in proc.log and "duplicates=0 " not in proc.log.splitlines()[-2]


@pytest.mark.parametrize("abrupt", [False, True], ids=["close", "tcp-reset"])
def test_cut_connections_reconnect_and_gaps_are_recorded(tmp_path, abrupt):
    sim, proc = run_faulty(tmp_path, lambda s: each(s, lambda m: s.call(m.cut_connections(abrupt))))
    for m in sim.markets():
        check_run(m, tmp_path / "data")
        assert m.connections_opened >= 2
    assert "connection lost" in proc.log


def test_silent_connection_is_detected_and_replaced(tmp_path):
    sim, proc = run_faulty(tmp_path, lambda s: each(s, lambda m: setattr(m.faults, "stall", True)),
                           seconds=5, after=lambda s: each(s, lambda m: setattr(m.faults, "stall", False)))
    for m in sim.markets():
        seen = check_run(m, tmp_path / "data")
        assert seen["gaps"].get("reconnect", 0) >= 1, seen
    assert "connection dead" in proc.log and "no data frame for" in proc.log


def test_server_pings_are_answered(tmp_path):
    # pings every 0.3 s, dropped after 1.5 s without a pong: a client that did not answer would be cut
    sim, proc = run_faulty(tmp_path, lambda s: None, sim_kw=dict(ping_interval=0.3, pong_timeout=1.5))
    for m in sim.markets():
        check_run(m, tmp_path / "data", allow_gaps=False)
        assert m.connections_opened == 1


def test_pongs_not_counted_server_drops_us_and_we_recover(tmp_path):
    sim, proc = run_faulty(tmp_path, lambda s: each(s, lambda m: setattr(m.faults, "count_pongs", False)),
                           sim_kw=dict(ping_interval=0.3, pong_timeout=1.5),
                           after=lambda s: each(s, lambda m: setattr(m.faults, "count_pongs", True)))
    for m in sim.markets():
        check_run(m, tmp_path / "data")
        assert m.connections_opened >= 2


def test_connections_ended_at_max_age(tmp_path):
    sim, proc = run_faulty(tmp_path, lambda s: each(s, lambda m: setattr(m.faults, "max_age", 2.5)),
                           after=lambda s: each(s, lambda m: setattr(m.faults, "max_age", None)))
    for m in sim.markets():
        check_run(m, tmp_path / "data")
        assert m.connections_opened >= 2


def test_server_shutdown_replaces_make_before_break(tmp_path):
    sim, proc = run_faulty(tmp_path, lambda s: each(s, lambda m: s.call(m.server_shutdown())))
    for m in sim.markets():
        check_run(m, tmp_path / "data", allow_gaps=False)
        assert m.connections_opened == 2
    assert proc.log.count("reason=serverShutdown") == 2


def test_rotation_loses_nothing_and_writes_nothing_twice(tmp_path):
    sim, proc = run_faulty(tmp_path, lambda s: None, seconds=14, collector_kw=dict(ws_rotate_after=10))
    for m in sim.markets():
        check_run(m, tmp_path / "data", allow_gaps=False)
        assert m.connections_opened >= 2
    assert proc.log.count("reason=age") >= 2


def test_garbage_frames_are_counted_never_rows(tmp_path):
    sim, proc = run_faulty(tmp_path, lambda s: each(s, lambda m: setattr(m.faults, "garbage_frames", 6)))
    for m in sim.markets():
        assert m.garbage_sent == 6
        check_run(m, tmp_path / "data", allow_gaps=False)
    assert "malformed frame skipped" in proc.log or "malformed oversized frame" in proc.log
    last_status = [line for line in proc.log.splitlines() if "status market=spot" in line][-1]
    assert "malformed=6" in last_status


@pytest.mark.parametrize("replies", [
    [(429, 1)] * 3, [(418, 2)], [(503, None)] * 3, [(500, None), (502, None)], [(429, None)],
], ids=["429", "418", "503", "500-502", "429-no-retry-after"])
def test_rest_errors_are_retried_never_lost(tmp_path, replies):
    def fault(m):
        m.faults.rest_statuses.extend(replies)
        m.faults.drop_diffs = 1  # a gap: the collector asks for a snapshot at once

    sim, proc = run_faulty(tmp_path, lambda s: each(s, fault), seconds=5 if replies[0][1] is not None else 62)
    for m in sim.markets():
        failed = [r for r in m.rest_log if r[2] != 200]
        assert len(failed) == len(replies)
        ok_symbols = {r[1] for r in m.rest_log if r[2] == 200}
        assert ok_symbols == set(SYMBOLS)
        check_run(m, tmp_path / "data", snapshot_within_s=70)
    if replies[0][0] in (418, 429):
        assert "rate limited" in proc.log


def test_slow_rest_replies(tmp_path):
    def fault(m):
        m.faults.rest_delay = 1.5
        m.faults.drop_diffs = 1

    sim, proc = run_faulty(tmp_path, lambda s: each(s, fault),
                           after=lambda s: each(s, lambda m: setattr(m.faults, "rest_delay", 0.0)))
    for m in sim.markets():
        seen = check_run(m, tmp_path / "data")
        assert seen["gaps"].get("sequence") == 1


SOAK = float(os.environ.get("FAULT_SOAK_SECONDS", "45"))


@pytest.mark.slow
def test_all_faults_together(tmp_path):
    """Every fault at random moments for FAULT_SOAK_SECONDS (45 in CI; the note's long run used 300)."""
    rng = random.Random(7)
    counts = {}

    def chaos(sim):
        deadline = time.monotonic() + SOAK
        while time.monotonic() < deadline:
            m = rng.choice(sim.markets())
            f = rng.choice(["drop", "dup", "cut", "reset", "stall", "shutdown", "garbage", "rest", "age"])
            counts[f] = counts.get(f, 0) + 1
            if f == "drop":
                m.faults.drop_diffs += rng.randint(1, 3)
            elif f == "dup":
                m.faults.duplicate_frames += 10
            elif f in ("cut", "reset"):
                sim.call(m.cut_connections(abrupt=f == "reset"))
            elif f == "stall":
                m.faults.stall = True
                time.sleep(4)
                m.faults.stall = False
            elif f == "shutdown":
                sim.call(m.server_shutdown())
            elif f == "garbage":
                m.faults.garbage_frames += 2
            elif f == "rest":
                m.faults.rest_statuses.append(rng.choice([(429, 1), (503, None), (418, 1)]))
            elif f == "age":
                m.faults.max_age = 3
                time.sleep(4)
                m.faults.max_age = None
            time.sleep(rng.uniform(0.5, 2.0))

    sim, proc = run_faulty(tmp_path, chaos, seconds=0, collector_kw=dict(ws_rotate_after=15), redundancy=2)
    seen = {m.market.name: check_run(m, tmp_path / "data", snapshot_within_s=8) for m in sim.markets()}
    print("faults applied:", counts, "seen:", seen)
