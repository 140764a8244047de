"""`collector.py verify`: what can be proven about recorded days.

Per symbol: rows; the diff chain rebuilt from the data (the market's continuity rule,
`Market.continues`) with every break matched against the `gaps` rows recorded; duplicates; rows
out of order; holes in time coverage; and the strongest check: the book rebuilt from each
REST snapshot plus the diffs after it, compared with the next snapshot (levels both cover)
and with every partial-depth frame of the same update id (Binance's free checksum).
Crossed books and negative sizes are errors. Problems make the exit status 1.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from markets import MARKETS, Market
from research.book import Book, agreement
from research.data import load

HOLE_US = 60_000_000  # a minute without a diff of a symbol is reported as a coverage hole


def _day_range(day: str | None) -> tuple[int | None, int | None]:
    if day is None:
        return None, None
    from storage.files import US_PER_DAY, day_start_us
    start = day_start_us(day)
    return start, start + US_PER_DAY


def verify_symbol(diffs: list, snaps: list, partials: list, gaps: list, market: Market) -> dict:
    r: dict[str, Any] = {"diffs": len(diffs), "snapshots": len(snaps), "partials": len(partials), "problems": []}
    ids = Counter(d["final_update_id"] for d in diffs)
    r["duplicates"] = sum(n - 1 for n in ids.values() if n > 1)
    by_time = sorted(diffs, key=lambda d: (d["received_time"], d["final_update_id"]))
    r["out_of_order"] = sum(1 for a, b in zip(by_time, by_time[1:], strict=False) if b["final_update_id"] < a["final_update_id"])
    times = [d["received_time"] for d in by_time]
    r["coverage_holes"] = [[a, b] for a, b in zip(times, times[1:], strict=False) if b - a > HOLE_US]
    chain = sorted({d["final_update_id"]: d for d in diffs}.values(), key=lambda d: d["final_update_id"])
    breaks = []
    for a, b in zip(chain, chain[1:], strict=False):
        if not market.continues(b["first_update_id"], b["prev_final_update_id"], a["final_update_id"]):
            breaks.append((a["final_update_id"], b["first_update_id"]))
    recorded = [(g["last_final_update_id"], g["next_first_update_id"]) for g in gaps]
    # a row with next_first_update_id null ends the symbol's record (halted, delisted, unranked)
    unexplained = [br for br in breaks
                   if not any((lf is None or lf <= br[0]) and (nf is None or nf >= br[1]) for lf, nf in recorded)]
    r["breaks_in_data"], r["gap_rows"], r["unexplained_breaks"] = len(breaks), len(gaps), unexplained[:10]
    if unexplained:
        r["problems"].append(f"{len(unexplained)} breaks in the diff chain with no gap row")
    if r["duplicates"]:
        r["problems"].append(f"{r['duplicates']} diffs written more than once")
    r.update(_rebuild(chain, snaps, partials, market))
    wrong = r["snapshot_levels_compared"] - r["snapshot_levels_same"]
    if wrong:
        first = r["snapshot_disagreements"][0]
        r["problems"].append(f"{wrong} rebuilt levels disagree with the snapshots (first: lastUpdateId "
                             f"{first['lastUpdateId']} {first['side']} {first['price']:g}: rebuilt "
                             f"{first['rebuilt']}, snapshot {first['snapshot']})")
    return r


def _rebuild(chain: list, snaps: list, partials: list, market: Market) -> dict:
    # A snapshot with lastUpdateId L holds every event up to L: it (re)starts an unsynced
    # book before the diff ending at L (which joins it), but a synced book is compared
    # with it only after that diff is applied.
    events: list[tuple] = [(s["lastUpdateId"], 0, "snapshot", s) for s in snaps]
    events += [(s["lastUpdateId"], 1.5, "check", s) for s in snaps]
    events += [(d["final_update_id"], 1, "diff", d) for d in chain]
    events += [(p["final_update_id"], 2, "partial", p) for p in partials]
    events.sort(key=lambda e: (e[0], e[1]))
    book = Book(market)
    out: dict[str, Any] = {
        "snapshot_levels_same": 0, "snapshot_levels_compared": 0, "snapshots_compared": 0,
        "snapshots_straddled": 0, "snapshots_not_comparable": 0, "snapshot_disagreements": [],
        "partial_frames_compared": 0, "partial_frames_identical": 0, "crossed": 0, "negative": 0, "resyncs": 0}
    pending = None  # a snapshot whose id falls inside the next diff's range: compared when that diff comes

    def compare(snap: dict, skip: tuple = ((), ())) -> None:
        same, total, wrong = agreement(book, snap["bid_prices"], snap["bid_sizes"], snap["ask_prices"],
                                       snap["ask_sizes"], skip)
        out["snapshot_levels_same"] += same
        out["snapshot_levels_compared"] += total
        out["snapshots_compared"] += 1
        out["snapshot_disagreements"] += [{"lastUpdateId": snap["lastUpdateId"], "side": s, "price": p, "rebuilt": a,
                                           "snapshot": b} for s, p, a, b in wrong][:10 - len(out["snapshot_disagreements"])]

    for _, _, what, row in events:
        levels = (row["bid_prices"], row["bid_sizes"], row["ask_prices"], row["ask_sizes"])
        if what == "snapshot":
            if not book.synced:
                book.reset(row["lastUpdateId"], *levels)
            continue
        if what == "check":
            # a book synced from an earlier snapshot (not from this one, nor reset since),
            # compared where both describe the same update id: the book's last diff ends at
            # the snapshot's id; if the id falls inside the next diff's [U, u] instead, at
            # the levels that diff does not touch (decided when it comes)
            if book.synced and book.snapshot_id != row["lastUpdateId"]:
                if book.last_u == row["lastUpdateId"]:
                    compare(row)
                else:
                    if pending is not None:
                        out["snapshots_not_comparable"] += 1
                    pending = row
            continue
        if what == "partial":
            if book.synced and book.last_u == row["final_update_id"]:
                n = max(len(row["bid_prices"]), len(row["ask_prices"]))
                bids, asks = book.top(n)
                out["partial_frames_compared"] += 1
                mine = ([p for p, _ in bids], [q for _, q in bids], [p for p, _ in asks], [q for _, q in asks])
                out["partial_frames_identical"] += mine == tuple(list(x) for x in levels)
            continue
        if pending is not None:
            L = pending["lastUpdateId"]
            if book.synced and row["first_update_id"] <= L < row["final_update_id"] and \
                    book.offer(row["first_update_id"], row["final_update_id"], row["prev_final_update_id"]) == "apply":
                compare(pending, (row["bid_prices"], row["ask_prices"]))
                out["snapshots_straddled"] += 1
            else:
                out["snapshots_not_comparable"] += 1
            pending = None
        verdict = book.offer(row["first_update_id"], row["final_update_id"], row["prev_final_update_id"])
        if verdict == "gap":
            if book.synced:
                out["resyncs"] += 1
            book = Book(market)
            continue
        if verdict == "apply":
            book.apply(row["final_update_id"], *levels)
            out["crossed"] += book.crossed()
            out["negative"] += book.negative()
    return out


def clock_check(rows: list[dict], max_offset_ms: float) -> dict:
    """The `clock` samples: how many, how many the kernel called unsynchronised, the largest
    offset from the exchange, and how many were beyond the bound (after half the round trip)."""
    offsets = [(r["offset_us"], r["rtt_us"] or 0) for r in rows if r["offset_us"] is not None]
    beyond = [o for o, rtt in offsets if abs(o) - rtt / 2 > max_offset_ms * 1000]
    return {"samples": len(rows), "unsynced": sum(1 for r in rows if r["synced"] is False),
            "offset_max_ms": max((abs(o) for o, _ in offsets), default=0) / 1000, "beyond_bound": len(beyond),
            "bound_ms": max_offset_ms}


def verify(data_dir: Path, market: str, day: str | None = None, max_offset_ms: float = 100.0) -> dict:
    start, end = _day_range(day)
    report: dict[str, Any] = {"market": market, "day": day, "symbols": {}, "problems": [], "warnings": []}
    try:
        diffs = load(data_dir, market, "diff_orderbooks", start=start, end=end).to_pylist()
    except FileNotFoundError as e:
        report["problems"].append(str(e))
        return report
    optional = {}
    for kind in ("orderbooks", "partial_orderbooks", "gaps", "clock"):
        try:
            optional[kind] = load(data_dir, market, kind, start=start, end=end).to_pylist()
        except FileNotFoundError:
            optional[kind] = []
    # the clock's health is a warning about the stamps, not a fault of the data: it does not
    # change verify's exit status
    report["clock"] = clock = clock_check(optional["clock"], max_offset_ms)
    if clock["unsynced"]:
        report["warnings"].append(f"clock: the kernel called the clock unsynchronised in {clock['unsynced']} of "
                                  f"{clock['samples']} samples: received_time may be off")
    if clock["beyond_bound"]:
        report["warnings"].append(f"clock: {clock['beyond_bound']} samples off the exchange by more than "
                                  f"{max_offset_ms:g} ms (at most {clock['offset_max_ms']:.1f} ms)")
    group = lambda rows: {s: [r for r in rows if r["symbol"] == s] for s in {r["symbol"] for r in rows}}  # noqa: E731
    d, s, p, g = group(diffs), group(optional["orderbooks"]), group(optional["partial_orderbooks"]), group(optional["gaps"])
    for symbol in sorted(d):
        r = verify_symbol(d[symbol], s.get(symbol, []), p.get(symbol, []), g.get(symbol, []), MARKETS[market])
        if r["crossed"]:
            r["problems"].append(f"{r['crossed']} crossed books after a diff")
        if r["negative"]:
            r["problems"].append(f"{r['negative']} books with a negative size")
        report["symbols"][symbol] = r
        report["problems"] += [f"{symbol}: {x}" for x in r["problems"]]
    if day is not None:
        quality_check(data_dir, market, day, report)
    return report


# what the quality record says that the data files can be asked again (the verify_* and
# delivery columns are not recomputed from the files)
RECOMPUTED = ("recorded_seconds", "covered_seconds", "coverage", "diffs", "partials", "snapshots", "gaps_sequence",
              "gaps_reconnect", "gaps_other", "restarts", "missing_update_ids", "clock_max_abs_offset_us",
              "clock_unsynced_seconds", "first_received_time", "last_received_time")


def quality_check(data_dir: Path, market: str, day: str, report: dict) -> None:
    """The day's quality record (storage/quality.py), in the report, and checked against the
    day files: recomputed from them, every figure must be the same. A record that
    disagrees (a data file changed, or the record) is a problem; a compacted day without
    one is a warning."""
    from storage.quality import day_quality, read_quality

    market_dir = data_dir / market
    record = read_quality(market_dir, day)
    compacted = (market_dir / "diff_orderbooks" / f"{day}.parquet").exists()
    if record is None:
        if compacted:
            report["warnings"].append(f"no quality record for {day} (it is written when a day is compacted)")
        return
    report["quality"] = record
    if not compacted:
        report["problems"].append(f"a quality record for {day} but no compacted day files")
        return
    again = {r["symbol"]: r for r in day_quality(market_dir, day, MARKETS[market].chains_by_pu).to_pylist()}
    recorded = {r["symbol"]: r for r in record}
    for symbol in sorted(set(again) | set(recorded)):
        a, b = recorded.get(symbol), again.get(symbol)
        if a is None or b is None:
            report["problems"].append(f"{symbol}: in the {'data' if a is None else 'quality record'} only")
            continue
        wrong = [f"{k} {a[k]} in the record, {b[k]} in the data" for k in RECOMPUTED if not _same(a[k], b[k])]
        if wrong:
            report["problems"].append(f"{symbol}: the quality record disagrees with the data: " + "; ".join(wrong))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))
    return bool(a == b)


def render(report: dict) -> str:
    lines = [f"{report['market']} {report['day'] or 'all days'}"]
    c = report.get("clock")
    if c:
        lines.append(f"  clock: {c['samples']} samples, not synchronised in {c['unsynced']}, offset from the exchange "
                     f"at most {c['offset_max_ms']:.1f} ms, {c['beyond_bound']} beyond {c['bound_ms']:g} ms")
    for sym, r in report["symbols"].items():
        snap = (f"{100 * r['snapshot_levels_same'] / r['snapshot_levels_compared']:.2f}% of "
                f"{r['snapshot_levels_compared']} comparable levels over {r['snapshots_compared']} snapshots "
                f"({r['snapshots_straddled']} of them without the levels of the diff straddling their id), "
                f"{r['snapshots_not_comparable']} not comparable"
                if r["snapshot_levels_compared"] else "no snapshot pair")
        part = (f"{r['partial_frames_identical']}/{r['partial_frames_compared']} identical"
                if r["partial_frames_compared"] else "none compared")
        lines.append(f"  {sym:14} diffs={r['diffs']} snapshots={r['snapshots']} partials={r['partials']} "
                     f"breaks={r['breaks_in_data']} gap_rows={r['gap_rows']} unexplained={len(r['unexplained_breaks'])} "
                     f"duplicates={r['duplicates']} out_of_order={r['out_of_order']} holes={len(r['coverage_holes'])} "
                     f"rebuilt-vs-snapshot: {snap}; partial frames: {part}; crossed={r['crossed']} "
                     f"negative={r['negative']}")
    q = report.get("quality")
    if q:
        worst = sorted(q, key=lambda r: (r["coverage"] if r["coverage"] is not None else 2.0, r["symbol"]))
        whole = sum(1 for r in q if r["coverage"] == 1.0)
        lines.append(f"  quality: {len(q)} symbols, {whole} whole (coverage 1); lowest: " + ", ".join(
            f"{r['symbol']} {r['coverage']:.6f} ({r['recorded_seconds'] - r['covered_seconds']:.1f} s uncovered)"
            for r in worst[:5] if r["coverage"] is not None and r["coverage"] < 1.0) if whole < len(q) else
            f"  quality: {len(q)} symbols, every one whole (coverage 1)")
    lines += [f"  WARNING {x}" for x in report.get("warnings", [])]
    lines += [f"  PROBLEM {x}" for x in report["problems"]] or ["  no problems found"]
    return "\n".join(lines)


def main(data_dir: Path, markets: list[str], day: str | None, as_json: bool, max_offset_ms: float = 100.0) -> int:
    reports = [verify(data_dir, m, day, max_offset_ms) for m in markets]
    print(json.dumps(reports, indent=1) if as_json else "\n".join(render(r) for r in reports))
    return 1 if any(r["problems"] for r in reports) else 0
