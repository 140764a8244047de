"""`collector.py merge SRC [SRC ...] --out DIR [--day D]`: several recordings of the same
markets (two hosts, or a host and its re-run) made into one set, with the same tree,
schemas and day files.

Per market, kind and day, symbols a batch at a time (their rows from every source: day
files, sorted by symbol, are read by row group; a current day's part files are read
whole, once per batch):
- a diff is kept once per (symbol, final_update_id), a partial frame once per (symbol,
  final_update_id), a snapshot once per (symbol, lastUpdateId): the copy received first
  (the earliest `received_time`; its other columns come with it);
- `gaps` are recomputed from the merged diff chain (`Market.continues`): a break stays
  only where no source holds the missing updates. Each break keeps the reason and
  detection time of a source row that covers it (`reconnect`, `sequence`, ...), a
  symbol's first diff gets a `start` row, and a record's end (`halted`, `delisted`,
  `unranked`) stays where no later diff of the symbol exists;
- the output day file is written to a temporary name and renamed when complete;
- then the day's `quality` record is computed from the merged files (storage/quality.py).

Memory: one batch of symbols from every source at a time, sized from the files' row
counts so that a batch is about `rows_budget` rows of the busiest kind (all sources
together), one kind at a time, plus the writers' row groups: bounded whatever the number
of symbols or days (BENCHMARKS.md, Merge).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from markets import MARKETS, Market
from storage.files import parquet_options, publish, temp_name
from storage.quality import QUALITY_KIND, write_day_quality
from storage.schemas import SCHEMAS, SORT_KEYS, exchange_times_in_us

log = logging.getLogger(__name__)

KINDS = ("diff_orderbooks", "partial_orderbooks", "orderbooks", "gaps")
# what makes two rows the same message, per kind
KEYS = {"diff_orderbooks": "final_update_id", "partial_orderbooks": "final_update_id", "orderbooks": "lastUpdateId"}
_DAY = re.compile(r"^(\d{4}-\d{2}-\d{2})(\.parquet)?$")
ROW_GROUP = 131_072
ROWS_BUDGET = 100_000  # rows of the busiest kind read a batch, all sources together (~70 MB of depth20 rows)


@dataclass(frozen=True)
class Source:
    """A data_dir tree on some filesystem (local, or S3 through pyarrow)."""

    fs: pafs.FileSystem
    root: str            # path of the data_dir on `fs` (for S3: bucket/prefix)
    name: str            # as the user wrote it, for messages

    def listdir(self, path: str) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (OSError, FileNotFoundError):
            return []

    def days(self, market: str) -> set[str]:
        out = set()
        for kind in KINDS:
            for info in self.listdir(f"{self.root}/{market}/{kind}"):
                m = _DAY.match(info.base_name)
                if m and (m.group(2) or info.type == pafs.FileType.Directory):
                    out.add(m.group(1))
        return out

    def files(self, market: str, kind: str, day: str) -> list[str]:
        """The day file and the day's part files (a day being recorded), if any."""
        base = f"{self.root}/{market}/{kind}"
        found = [i.path for i in self.listdir(base) if i.base_name == f"{day}.parquet"]
        found += sorted(i.path for i in self.listdir(f"{base}/{day}")
                        if i.base_name.endswith(".parquet") and not i.base_name.startswith("."))
        return found


def open_source(text: str, s3: pafs.FileSystem | None = None) -> Source:
    """A local folder, or `s3://bucket/prefix` (read with `s3`, made from the upload
    credentials by the caller)."""
    if text.startswith("s3://"):
        if s3 is None:
            raise ValueError(f"{text}: an s3:// source needs the upload credentials (R2_* in the environment)")
        return Source(s3, text[len("s3://"):].rstrip("/"), text)
    path = Path(text).resolve()
    if not path.is_dir():
        raise ValueError(f"{text}: not a folder")
    return Source(pafs.LocalFileSystem(), str(path), text)


def merge(sources: list[Source], out: Path, day: str | None = None, markets: tuple[str, ...] = tuple(MARKETS),
          compression_level: int = 9, rows_budget: int = ROWS_BUDGET) -> dict[str, int]:
    """Merge every market and day found in `sources` (or only `day`) into `out`; rows
    written by kind."""
    written: dict[str, int] = {}
    for market in markets:
        days = sorted(set().union(*(s.days(market) for s in sources)))
        for d in days if day is None else [x for x in days if x == day]:
            for kind, n in merge_day(sources, out, MARKETS[market], d, compression_level, rows_budget).items():
                written[kind] = written.get(kind, 0) + n
    return written


def merge_day(sources: list[Source], out: Path, market: Market, day: str, compression_level: int,
              rows_budget: int = 0) -> dict[str, int]:
    files = {kind: [(s.fs, f) for s in sources for f in s.files(market.name, kind, day)] for kind in KINDS}
    symbols = sorted(set().union(*(_symbols(fs, f) for kind in KINDS for fs, f in files[kind])))
    busiest = max(sum(_rows(fs, f) for fs, f in files[kind]) for kind in KINDS)
    per_batch = max(1, min(512, int((rows_budget or ROWS_BUDGET) * len(symbols) / max(1, busiest))))
    log.info("merge market=%s day=%s: %d symbols from %d sources, %d a batch", market.name, day, len(symbols),
             len(sources), per_batch)
    writers = _Writers(out / market.name, day, compression_level)
    try:
        for i in range(0, len(symbols), per_batch):
            batch = symbols[i:i + per_batch]
            diffs = _dedup(_read(files["diff_orderbooks"], "diff_orderbooks", batch), "diff_orderbooks")
            writers.write("diff_orderbooks", diffs)
            writers.write("gaps", recompute_gaps(diffs, _read(files["gaps"], "gaps", batch), market))
            del diffs
            for kind in ("partial_orderbooks", "orderbooks"):
                writers.write(kind, _dedup(_read(files[kind], kind, batch), kind))
        written = writers.close()
    except BaseException:
        writers.abort()
        raise
    # the merged day's quality record, from the merged day files (the sources' own records
    # speak for each host; this one for what the merge holds; its delivery columns are null:
    # no processor saw the merged copies)
    quality = write_day_quality(out / market.name, day, market.chains_by_pu, compression_level, delivery_known=False)
    written[QUALITY_KIND] = pq.ParquetFile(quality).metadata.num_rows
    return written


def _rows(fs: pafs.FileSystem, path: str) -> int:
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _symbols(fs: pafs.FileSystem, path: str) -> set[str]:
    with fs.open_input_file(path) as f:
        column = pq.read_table(f, columns=["symbol"]).column("symbol")
    return set(pc.unique(column).to_pylist())


def _read(files: list[tuple[pafs.FileSystem, str]], kind: str, symbols: list[str]) -> pa.Table:
    """The rows of `symbols` in every file (row groups whose statistics exclude them are skipped)."""
    schema = SCHEMAS[kind]
    parts = []
    wanted = ds.field("symbol").isin(symbols)
    for fs, path in files:
        table = ds.dataset(path, filesystem=fs, format="parquet", schema=schema).to_table(filter=wanted)
        parts.append(exchange_times_in_us(table))  # a version-1 file's ms become µs
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _dedup(table: pa.Table, kind: str) -> pa.Table:
    """Each message once: the copy received first, the rows in the day file's order."""
    if table.num_rows == 0:
        return table
    key = KEYS[kind]
    table = table.take(pc.sort_indices(table, sort_keys=[("symbol", "ascending"), (key, "ascending"),
                                                          ("received_time", "ascending")]))
    sym, ids = table.column("symbol").combine_chunks(), table.column(key).combine_chunks()
    same = pc.and_(pc.equal(sym[1:], sym[:-1]), pc.equal(ids[1:], ids[:-1]))
    keep = pa.concat_arrays([pa.array([True]), pc.invert(pc.fill_null(same, False))])
    table = table.filter(keep)
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in SORT_KEYS[kind]]))


def recompute_gaps(diffs: pa.Table, source_gaps: pa.Table, market: Market) -> pa.Table:
    """The `gaps` rows of the merged diffs: a `start` row at each symbol's first diff, a row
    at each break left in the merged chain (with the reason and time of a source row that
    covers it), and each record's end that no later diff follows."""
    by_symbol: dict[str, list[dict]] = {}
    for g in source_gaps.to_pylist():
        by_symbol.setdefault(g["symbol"], []).append(g)
    rows: list[dict] = []
    chain = diffs.take(pc.sort_indices(diffs, sort_keys=[("symbol", "ascending"), ("final_update_id", "ascending")]))
    sym = np.asarray(chain.column("symbol").to_pylist(), dtype=object)
    U = chain.column("first_update_id").to_numpy(zero_copy_only=False)
    u = chain.column("final_update_id").to_numpy(zero_copy_only=False)
    received = chain.column("received_time").to_numpy(zero_copy_only=False)
    n = len(u)
    if n:
        first = np.ones(n, dtype=bool)
        first[1:] = sym[1:] != sym[:-1]
        if market.chains_by_pu:
            pu = chain.column("prev_final_update_id").to_numpy(zero_copy_only=False)
            follows = np.zeros(n, dtype=bool)
            follows[1:] = pu[1:] == u[:-1]
        else:
            follows = np.zeros(n, dtype=bool)
            follows[1:] = U[1:] <= u[:-1] + 1
        for i in np.flatnonzero(first):
            rows.append(_start_row(str(sym[i]), int(U[i]), int(received[i]), by_symbol.get(str(sym[i]), [])))
        for i in np.flatnonzero(~first & ~follows):
            rows.append(_break_row(str(sym[i]), int(u[i - 1]), int(U[i]), int(received[i]),
                                   by_symbol.get(str(sym[i]), [])))
        last_u = {str(sym[i]): int(u[i]) for i in np.flatnonzero(np.append(first[1:], True))}
    else:
        last_u = {}
    ends: dict[tuple, dict] = {}
    for symbol, gs in by_symbol.items():
        for g in gs:
            if g["next_first_update_id"] is None and (g["last_final_update_id"] or -1) >= last_u.get(symbol, -1):
                ends.setdefault((symbol, g["last_final_update_id"], g["reason"]), g)  # a record's end, once
    rows += sorted(ends.values(), key=lambda g: g["detected_time"])
    table = pa.Table.from_pylist(rows, schema=SCHEMAS["gaps"])
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in SORT_KEYS["gaps"]]))


def _start_row(symbol: str, first_U: int, received: int, gaps: list[dict]) -> dict:
    starts = [g for g in gaps if g["reason"] == "start" and g["next_first_update_id"] == first_U]
    detected = min((g["detected_time"] for g in starts), default=received)
    return {"detected_time": detected, "symbol": symbol, "last_final_update_id": None,
            "next_first_update_id": first_U, "reason": "start"}


def _break_row(symbol: str, last_u: int, next_U: int, received: int, gaps: list[dict]) -> dict:
    """A break no source fills: a source row that covers it gives its reason and time
    (a break over a source's `start` or record's end is that source's story)."""
    covering = [g for g in gaps
                if (g["last_final_update_id"] is None or g["last_final_update_id"] <= last_u)
                and (g["next_first_update_id"] is None or g["next_first_update_id"] >= next_U)]
    covering.sort(key=lambda g: (g["reason"] == "start", g["detected_time"]))
    reason, detected = (covering[0]["reason"], covering[0]["detected_time"]) if covering else ("sequence", received)
    return {"detected_time": detected, "symbol": symbol, "last_final_update_id": last_u,
            "next_first_update_id": next_U, "reason": reason}


class _Writers:
    """One day file per kind, written under a temporary name and published at the end."""

    def __init__(self, market_dir: Path, day: str, compression_level: int):
        self.market_dir, self.day, self.level = market_dir, day, compression_level
        self.open: dict[str, tuple[pq.ParquetWriter, Path]] = {}
        self.rows: dict[str, int] = {}

    def write(self, kind: str, table: pa.Table) -> None:
        if kind not in self.open:
            final = self.market_dir / kind / f"{self.day}.parquet"
            final.parent.mkdir(parents=True, exist_ok=True)
            schema = SCHEMAS[kind]
            sorting = pq.SortingColumn.from_ordering(schema, [(k, "ascending") for k in SORT_KEYS[kind]])
            writer = pq.ParquetWriter(temp_name(final), schema, sorting_columns=sorting,
                                      **parquet_options(self.level, schema))
            self.open[kind] = (writer, final)
            self.rows[kind] = 0
        if table.num_rows:
            self.open[kind][0].write_table(table.cast(SCHEMAS[kind]), row_group_size=ROW_GROUP)
            self.rows[kind] += table.num_rows

    def close(self) -> dict[str, int]:
        for writer, final in self.open.values():
            writer.close()
            publish(temp_name(final), final)
        return self.rows

    def abort(self) -> None:
        for writer, final in self.open.values():
            try:
                writer.close()
            finally:
                temp_name(final).unlink(missing_ok=True)

