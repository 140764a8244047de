"""The quality record: one row per UTC day and symbol of a market, saying how whole the day's
data is (`data_dir/<market>/quality/YYYY-MM-DD.parquet`; docs/data.md, "quality").

Written when a day is compacted (`storage.compact`) and by `merge` for its output, from the
day files alone, so that it says what the files hold. How the seconds are counted:

- A symbol's **record** runs from its first diff after a `start` row (or from 00:00 when
  the day's first event of the symbol is not a `start`: the record continues from the day
  before) to its last diff before a row that ends the record (`halted`, `delisted`,
  `unranked`: `next_first_update_id` null), or to 24:00 when no such row follows (it
  continues into the next day). A symbol can have several records a day (delisted, listed
  again); `recorded_seconds` is their sum.
- `diffs_from_one_copy` and `connections_lost` come from what only the processor saw (the
  `quality` part files of the day, handlers/process/delivery.py): the day's diffs less
  those another connection delivered too, and the losses of connections carrying the
  symbol.
- A **break** (a `gaps` row that is neither `start` nor an end) is uncovered from the last
  diff before it (the one whose `final_update_id` is the row's `last_final_update_id`) to
  the first diff after the snapshot that resynced it (the first snapshot taken after the
  break whose `lastUpdateId` reaches past the missing ids), or to the record's end when no
  snapshot resynced it that day. A **restart** (a `start` row inside a record: the
  collector stopped and started again, nothing marked the record's end) is uncovered the
  same way, from the last diff before it; `restarts` counts them. `covered_seconds` is the
  recorded time outside every uncovered interval (overlaps counted once).

A collector that stops and starts again on a later day shows the hole from that day's
00:00 on (the day it stopped cannot know it did not go on). Work is in numpy over the day
file's columns, sorted by symbol and time as day files are (sorted here if they are not);
gap rows are few.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.files import US_PER_DAY, day_start_us, write_table_atomic
from storage.schemas import QUALITY

QUALITY_KIND = "quality"
BREAKS = {"sequence": "gaps_sequence", "reconnect": "gaps_reconnect"}  # any other break: gaps_other
CLOCK_SAMPLE_MAX_US = 120_000_000  # a clock sample speaks for at most this long (they come once a minute)


def quality_file(market_dir: Path, day: str) -> Path:
    return market_dir / QUALITY_KIND / f"{day}.parquet"


def _read(path: Path, columns: list[str]) -> pa.Table | None:
    if not path.exists():
        return None
    return pq.read_table(path, columns=columns)


class _BySymbol:
    """A day file's rows sorted by symbol (as day files are): each symbol's slice."""

    def __init__(self, table: pa.Table | None, columns: list[str], time_column: str | None = None):
        self.slices: dict[str, tuple[int, int]] = {}
        self.cols: dict[str, np.ndarray] = {c: np.empty(0, np.int64) for c in columns}
        if table is None or table.num_rows == 0:
            return
        if not self._cut(table):  # not a day file's order (e.g. written by an older version): sorted here
            table = table.sort_by([("symbol", "ascending")] + ([(time_column, "ascending")] if time_column else []))
            self.slices = {}
            self._cut(table)
        for c in columns:
            col = table.column(c)
            self.cols[c] = col.fill_null(-1).to_numpy() if col.null_count else col.to_numpy()

    def _cut(self, table: pa.Table) -> bool:
        """Each symbol's slice; False when its rows are not together (or, with a time
        column, not in time order)."""
        enc = pc.dictionary_encode(table.column("symbol")).combine_chunks()
        idx = enc.indices.to_numpy(zero_copy_only=False)
        cuts = np.flatnonzero(idx[1:] != idx[:-1]) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [len(idx)]))
        names = enc.dictionary.to_pylist()
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            name = names[idx[s]]
            if name in self.slices:
                return False
            self.slices[name] = (s, e)
        if "received_time" in table.column_names:
            t = table.column("received_time").to_numpy()
            steps = np.diff(t) < 0
            steps[cuts - 1] = False  # a new symbol may start earlier
            if steps.any():
                return False
        return True

    def of(self, symbol: str) -> dict[str, np.ndarray]:
        s, e = self.slices.get(symbol, (0, 0))
        return {c: v[s:e] for c, v in self.cols.items()}

    def count(self, symbol: str) -> int:
        s, e = self.slices.get(symbol, (0, 0))
        return e - s


def _union_length(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def symbol_quality(diffs: dict[str, np.ndarray], snaps: dict[str, np.ndarray], gaps: list[dict],
                   day_start: int, chains_by_pu: bool) -> dict:
    """The seconds and counts of one symbol's day (see the module's rules). `diffs`: its
    received_time and final_update_id, in time order; `snaps`: received_time and
    lastUpdateId; `gaps`: its gap rows in time order."""
    day_end = day_start + US_PER_DAY
    times, finals = diffs["received_time"], diffs["final_update_id"]
    snap_times, snap_ids = snaps["received_time"], snaps["lastUpdateId"]

    def last_diff_before(at: int, final: int | None) -> int | None:
        """Time of the diff that ended at `final` (else the last one before `at`)."""
        if final is not None:
            hit = np.flatnonzero(finals == final)
            if len(hit):
                return int(times[hit[-1]])
        i = int(np.searchsorted(times, at, side="right"))
        return int(times[i - 1]) if i else None

    def first_diff_after(at: int) -> int | None:
        i = int(np.searchsorted(times, at, side="left"))
        return int(times[i]) if i < len(times) else None

    def resynced_at(detected: int, needed: int | None) -> int | None:
        """The first diff after the first snapshot taken after `detected` that reaches `needed`."""
        i = int(np.searchsorted(snap_times, detected, side="left"))
        while i < len(snap_times):
            if needed is None or snap_ids[i] >= needed:
                applies = finals >= snap_ids[i] if chains_by_pu else finals > snap_ids[i]  # Market.predates
                after = np.flatnonzero((times >= snap_times[i]) & applies)
                return int(times[after[0]]) if len(after) else None
            i += 1
        return None

    records: list[list[int]] = []  # [start, end] of each record
    open_at: int | None = None
    if not gaps or gaps[0]["reason"] != "start" or (len(times) and gaps[0]["detected_time"] > times[0]):
        open_at = day_start  # the record continues from the day before
    uncovered: list[tuple[int, int]] = []
    counts = {"gaps_sequence": 0, "gaps_reconnect": 0, "gaps_other": 0, "restarts": 0}
    missing: int | None = None if chains_by_pu else 0
    for g in gaps:
        t, reason, last, nxt = g["detected_time"], g["reason"], g["last_final_update_id"], g["next_first_update_id"]
        if reason == "start":
            first = first_diff_after(t)
            if open_at is None:  # a new record
                open_at = first if first is not None else t
            else:  # the collector started again inside the record
                counts["restarts"] += 1
                since = last_diff_before(t, None)
                uncovered.append((since if since is not None else open_at, resynced_at(t, None) or day_end))
            continue
        if nxt is None:  # the record ends
            if open_at is not None:
                end = last_diff_before(t, last)
                records.append([open_at, max(end if end is not None else open_at, open_at)])
                open_at = None
            continue
        counts[BREAKS.get(reason, "gaps_other")] += 1
        if missing is not None and last is not None:
            missing += max(0, nxt - last - 1)
        since = last_diff_before(t, last)
        needed = (nxt - 1 if not chains_by_pu else nxt) if nxt is not None else None
        uncovered.append((since if since is not None else (open_at or day_start), resynced_at(t, needed) or day_end))
    if open_at is not None:
        records.append([open_at, day_end])
    recorded = sum(b - a for a, b in records)
    # the uncovered time that lies within a record, each instant once
    inside = [(max(a, ra), min(b, rb)) for a, b in uncovered for ra, rb in records if min(b, rb) > max(a, ra)]
    covered = recorded - _union_length(inside)
    return {"recorded_seconds": recorded / 1e6, "covered_seconds": covered / 1e6,
            "coverage": covered / recorded if recorded else None, "missing_update_ids": missing, **counts,
            "first_received_time": int(times[0]) if len(times) else None,
            "last_received_time": int(times[-1]) if len(times) else None,
            INTERVALS: ([(a, b) for a, b in records], inside)}


INTERVALS = "_intervals"  # symbol_quality's (records, uncovered parts of them), µs: not a column


def clock_figures(clock: pa.Table | None, day_end: int) -> tuple[int | None, float | None]:
    """The day's largest |local - exchange| offset (µs) and the seconds the kernel said the
    clock was not synchronised (each sample speaks until the next, at most 2 minutes)."""
    if clock is None or clock.num_rows == 0:
        return None, None
    clock = clock.sort_by("sample_time")
    offsets = clock.column("offset_us").drop_null()
    largest = int(pc.max(pc.abs(offsets)).as_py()) if len(offsets) else None
    t = clock.column("sample_time").to_numpy()
    synced = clock.column("synced").fill_null(True).to_numpy(zero_copy_only=False)
    spans = np.minimum(np.diff(np.append(t, day_end)), CLOCK_SAMPLE_MAX_US)
    return largest, float(spans[~synced].sum()) / 1e6


def day_quality(market_dir: Path, day: str, chains_by_pu: bool,
                intervals: dict[str, tuple[list, list]] | None = None, delivery_known: bool = True) -> pa.Table:
    """The quality rows of one market's day, from its day files; `intervals`, when given,
    gets each symbol's records and uncovered intervals (µs), for a picture by the hour.
    `delivery_known` False (a merge's output: no processor saw its copies): the delivery
    columns are null rather than a guess."""
    intervals = {} if intervals is None else intervals
    start = day_start_us(day)
    kind_file = lambda kind: market_dir / kind / f"{day}.parquet"  # noqa: E731
    diffs = _BySymbol(_read(kind_file("diff_orderbooks"), ["symbol", "received_time", "final_update_id"]),
                      ["received_time", "final_update_id"], "received_time")
    snaps = _BySymbol(_read(kind_file("orderbooks"), ["symbol", "received_time", "lastUpdateId"]),
                      ["received_time", "lastUpdateId"], "received_time")
    partials = _BySymbol(_read(kind_file("partial_orderbooks"), ["symbol"]), [])
    gap_table = _read(kind_file("gaps"), ["symbol", "detected_time", "last_final_update_id", "next_first_update_id",
                                          "reason"])
    gaps: dict[str, list[dict]] = {}
    for g in sorted(gap_table.to_pylist() if gap_table is not None else [], key=lambda g: g["detected_time"]):
        gaps.setdefault(g["symbol"], []).append(g)
    delivery = _delivery(market_dir / QUALITY_KIND / day)
    clock_max, clock_unsynced = clock_figures(_read(kind_file("clock"), ["sample_time", "synced", "offset_us"]),
                                              start + US_PER_DAY)
    rows = []
    for symbol in sorted(set(diffs.slices) | set(gaps) | set(snaps.slices) | set(partials.slices)):
        q = symbol_quality(diffs.of(symbol), snaps.of(symbol), gaps.get(symbol, []), start, chains_by_pu)
        intervals[symbol] = q.pop(INTERVALS)
        rows.append({"day": day, "symbol": symbol, **q, "diffs": diffs.count(symbol),
                     "partials": partials.count(symbol), "snapshots": snaps.count(symbol),
                     "verify_levels_compared": None, "verify_levels_agreed": None,
                     "connections_lost": delivery.get(symbol, (0, 0))[1] if delivery_known else None,
                     "diffs_from_one_copy": max(0, diffs.count(symbol) - delivery.get(symbol, (0, 0))[0])
                     if delivery_known else None,
                     "clock_max_abs_offset_us": clock_max, "clock_unsynced_seconds": clock_unsynced})
    return pa.Table.from_pylist(rows, schema=QUALITY)


def _delivery(parts_dir: Path) -> dict[str, tuple[int, int]]:
    """symbol -> (diffs duplicated, connections lost), summed over the day's part files."""
    parts = sorted(parts_dir.glob("*.parquet")) if parts_dir.is_dir() else []
    if not parts:
        return {}
    t = pa.concat_tables([pq.read_table(p) for p in parts])
    g = t.group_by("symbol").aggregate([("diffs_duplicated", "sum"), ("connections_lost", "sum")])
    return {s: (d, n) for s, d, n in zip(g.column("symbol").to_pylist(), g.column("diffs_duplicated_sum").to_pylist(),
                                         g.column("connections_lost_sum").to_pylist(), strict=True)}


def delivery_parts_days(market_dir: Path) -> list[str]:
    """Days whose delivery counts still wait in part files."""
    folder = market_dir / QUALITY_KIND
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.is_dir() else []


def write_day_quality(market_dir: Path, day: str, chains_by_pu: bool, compression_level: int,
                      delivery_known: bool = True) -> Path:
    """Compute and publish (atomically) the quality file of a market's day; then the day's
    delivery part files, folded into it, are removed (a crash before that only means the
    record is computed again from the same files)."""
    final = quality_file(market_dir, day)
    write_table_atomic(final, day_quality(market_dir, day, chains_by_pu, delivery_known=delivery_known),
                       compression_level)
    parts = market_dir / QUALITY_KIND / day
    if parts.is_dir():
        for p in parts.glob("*.parquet"):
            p.unlink()
        shutil.rmtree(parts, ignore_errors=True)  # and what a crashed writer left (temporaries)
    return final


def read_quality(market_dir: Path, day: str) -> list[dict] | None:
    path = quality_file(market_dir, day)
    return pq.read_table(path).to_pylist() if path.exists() else None


def hourly_coverage(intervals: dict[str, tuple[list, list]], day: str) -> tuple[list[str], np.ndarray]:
    """symbols, and their coverage in each hour of the day (NaN where not recorded)."""
    start = day_start_us(day)
    hours = [(start + h * 3_600_000_000, start + (h + 1) * 3_600_000_000) for h in range(24)]
    symbols = sorted(intervals)
    out = np.full((len(symbols), 24), np.nan)
    for i, symbol in enumerate(symbols):
        records, uncovered = intervals[symbol]
        for h, (a, b) in enumerate(hours):
            rec = sum(max(0, min(rb, b) - max(ra, a)) for ra, rb in records)
            if rec:
                gone = _union_length([(max(ua, a), min(ub, b)) for ua, ub in uncovered if min(ub, b) > max(ua, a)])
                out[i, h] = (rec - gone) / rec
    return symbols, out
