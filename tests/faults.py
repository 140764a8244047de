"""Invariants checked from the files on disk after a run against the (faulty) simulator."""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

import orjson

from simulator import Simulator
from tests.helpers import CollectorProcess, market_section, read_kind, write_config

US = 1_000_000


def pause_and_stop(sim, *procs: CollectorProcess) -> list[int]:
    """The end of a run: the simulator stops sending, the frames in flight land, SIGTERM
    stops each collector; their exit statuses."""
    for m in sim.markets():
        m.faults.paused = True
    time.sleep(1.5)
    return [p.stop() for p in procs]


@contextmanager
def both_markets(tmp_path, symbols, sim_kw=None, **collector):
    """Both markets of a recording simulator and the real collector on them (one batch per
    market): yields (sim, proc) once the collector records. At the end of the block the
    simulator pauses, frames in flight land, SIGTERM stops the collector, and it must
    have exited 0 with no traceback."""
    kw = dict(symbols=symbols, record=True, updates_per_s=40, **(sim_kw or {}))
    with Simulator(spot=dict(kw), futures=dict(kw)) as sim:
        cfg = write_config(tmp_path, [
            market_section("spot", sim.spot, symbols, snapshot_interval=30, snapshot_limit=100, partial_levels=5),
            market_section("futures", sim.futures, symbols, snapshot_interval=30, snapshot_limit=100),
        ], **collector)
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("recording market=futures")
            yield sim, proc
            rc, = pause_and_stop(sim, proc)
        finally:
            proc.kill()
    assert rc == 0, proc.log[-3000:]
    assert "Traceback" not in proc.log


def diff_rows(data_dir, market):
    t = read_kind(data_dir, market, "diff_orderbooks")
    return list(zip(t.column("symbol").to_pylist(), t.column("first_update_id").to_pylist(),
                    t.column("final_update_id").to_pylist(), strict=True)) if t.num_rows else []


def check_run(sim_market, data_dir, snapshot_within_s: float = 5.0, allow_gaps: bool = True,
              exempt=lambda t: False, only: set[str] | None = None) -> dict:
    """Every delivered diff recorded once; every diff not recorded covered by a gap row;
    a snapshot of the symbol within `snapshot_within_s` of each gap. Returns counts.
    Frames sent at a time for which `exempt(t)` holds need not be on disk (crash tests);
    `only`: the symbols this collector records (several collectors on one simulator)."""
    market = sim_market.market.name
    rows = diff_rows(data_dir, market)
    ids = [(s, u) for s, _, u in rows]
    dupes = [k for k, n in Counter(ids).items() if n > 1]
    assert not dupes, f"{market}: diffs written twice: {dupes[:5]}"
    on_disk = set(ids)
    delivered = set()
    for s in sim_market.sent:
        if sim_market.streams[s.stream].kind == "diff" and not exempt(s.t):
            d = orjson.loads(s.data)
            if only is None or d["s"] in only:
                delivered.add((d["s"], d["u"]))
    missing = delivered - on_disk
    assert not missing, f"{market}: delivered but not on disk: {sorted(missing)[:5]}"
    emitted = {(s, u): U for s, U, u, _ in sim_market.emitted if only is None or s in only}
    assert on_disk <= set(emitted), f"{market}: rows the exchange never sent"
    gaps = read_kind(data_dir, market, "gaps").to_pylist()
    by_symbol: dict[str, list] = {}
    for g in gaps:
        by_symbol.setdefault(g["symbol"], []).append(g)
    first_u = {}
    last_u = {}
    for s, _, u in rows:
        first_u[s] = min(first_u.get(s, u), u)
        last_u[s] = max(last_u.get(s, u), u)
    uncovered = []
    not_recorded = 0
    for (s, u), U in emitted.items():
        if (s, u) in on_disk or s not in first_u or not first_u[s] < u < last_u[s]:
            continue
        not_recorded += 1
        if not any((g["last_final_update_id"] or -1) < U and (g["next_first_update_id"] is None
                                                              or u < g["next_first_update_id"])
                   for g in by_symbol.get(s, [])):
            uncovered.append((s, U, u))
    assert not uncovered, f"{market}: diffs missing with no gap row: {uncovered[:5]}"
    snaps = read_kind(data_dir, market, "orderbooks").to_pylist()
    late = []
    for g in gaps:
        if g["next_first_update_id"] is None:
            continue  # the end of a symbol's record (it stopped trading): no snapshot follows
        t0 = g["detected_time"]
        if not any(sn["symbol"] == g["symbol"] and t0 <= sn["request_time"] <= t0 + snapshot_within_s * US
                   for sn in snaps):
            late.append(g)
    assert not late, f"{market}: gaps without a snapshot within {snapshot_within_s}s: {late[:3]}"
    reasons = Counter(g["reason"] for g in gaps)
    if not allow_gaps:
        assert set(reasons) == {"start"}, f"{market}: unexpected gaps {reasons}"
    seen = {"diffs_on_disk": len(on_disk), "delivered": len(delivered), "not_recorded": not_recorded,
            "dropped_by_fault": len(sim_market.dropped), "gaps": dict(reasons), "snapshots": len(snaps)}
    print(f"{market}: {seen}")  # shown with -s: what each fault test saw, for the record
    return seen


def unexplained_gaps(sim_market, data_dir) -> list[dict]:
    """`gaps` rows (other than `start`) that no outage explains: a gap is explained when some
    diff event inside it reached no connection at all (the simulator's own log of what it
    sent on each connection), that is, when every connection that carried the symbol was
    down, stalled, or had the event dropped at that moment."""
    reached = set()
    for s in sim_market.sent:
        if sim_market.streams[s.stream].kind == "diff":
            d = orjson.loads(s.data)
            reached.add((d["s"], d["u"]))
    emitted: dict[str, list[tuple[int, int]]] = {}
    for symbol, U, u, _ in sim_market.emitted:
        emitted.setdefault(symbol, []).append((U, u))
    out = []
    for g in read_kind(data_dir, sim_market.market.name, "gaps").to_pylist():
        if g["reason"] == "start" or g["next_first_update_id"] is None:
            continue
        lo, hi = g["last_final_update_id"] or -1, g["next_first_update_id"]
        inside = [(U, u) for U, u in emitted.get(g["symbol"], []) if lo < u < hi]
        if not any((g["symbol"], u) not in reached for _, u in inside):
            out.append(g)
    return out


def distinct_frames(sim_market, kind: str | None = None) -> list:
    """What the simulator sent, each frame once (`kind`: "diff" or "partial", or both).
    With several connections reading the same streams every frame went out once per
    connection; the collector keeps, for each (stream, update id), the frames of the
    connection that delivered it first (a spot partial frame may repeat its id on an
    unchanged book: those repeats count on that connection)."""
    first: dict = {}
    out = []
    for s in sim_market.sent:
        if kind is not None and sim_market.streams[s.stream].kind != kind:
            continue
        d = orjson.loads(s.data)
        key = (s.stream, d.get("u", d.get("lastUpdateId")))
        if first.setdefault(key, s.conn) == s.conn:
            out.append(s)
    return out
