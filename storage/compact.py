"""Compaction: a finished day's part files -> one `YYYY-MM-DD.parquet`, rows ordered by
symbol then time, in bounded memory.

A day small enough (three times its rows as Arrow: the rows, their sorted copy, the
encoder's buffers, within `memory_budget`) is read, sorted and written at once. A bigger
day is done in two passes: rows are first split into K buckets of whole symbols in
symbol order (temporary Arrow IPC streams, at most `MAX_BUCKETS` of them), then each
bucket is sorted and appended to the day file. Memory is then about three buckets, i.e.
the budget, or three times one symbol's day if a single symbol is bigger than a bucket
(or buckets are capped). The Arrow size is counted from the files' metadata
(`arrow_bytes`), not from their encoded size: part files of partial depth encode to a
third of it.

Crash safety: the day file is written under a temporary name and published by rename;
it lists the parts it contains in its metadata (`compacted_parts`). Parts are deleted
only after the rename; if a crash comes between the two, the next run sees those parts
named in the day file and deletes them instead of counting their rows twice. Parts
that arrive later for a compacted day (a late flush) are merged into it next time.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from markets import KINDS
from service.threads import name_os_thread
from storage.files import US_PER_DAY, day_of, day_start_us, fsync_dir, parquet_options, publish, temp_name
from storage.schemas import SORT_KEYS

log = logging.getLogger(__name__)

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
META_KEY = b"compacted_parts"
ROW_GROUP = 131_072


def parts_of(kind_dir: Path, day: str) -> list[Path]:
    return sorted((kind_dir / day).glob("part-*.parquet"))


def _already_in(day_file: Path) -> set[str]:
    if not day_file.exists():
        return set()
    meta = pq.read_schema(day_file).metadata or {}
    return set(json.loads(meta.get(META_KEY, b"[]")))


_WIDTH = {"INT64": 8, "DOUBLE": 8, "INT32": 4, "FLOAT": 4, "BOOLEAN": 1}


def arrow_bytes(f: pq.ParquetFile) -> int:
    """What a file's rows take as Arrow, from its metadata alone: each leaf column's values
    at their width, a list offset a row per list column, a string at 24 bytes or its
    plain size. Encoded sizes under-count: dictionary pages and delta-encoded ids made
    part files of partial depth a third of their Arrow size, and compacting 30 minutes of
    one market at 1,000 symbols passed 6.7 GB of RSS on a 512 MiB budget (BENCHMARKS.md,
    eighth session)."""
    md = f.metadata
    lists = sum(1 for field in f.schema_arrow if pa.types.is_list(field.type))
    total = 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        total += 4 * lists * rg.num_rows
        for j in range(rg.num_columns):
            c = rg.column(j)
            width = _WIDTH.get(c.physical_type)
            total += c.num_values * width if width else max(c.total_uncompressed_size, 24 * c.num_values)
    return total


def _sorted(table: pa.Table, kind: str) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in SORT_KEYS[kind]])


def compact_day(kind_dir: Path, day: str, kind: str, compression_level: int,
                memory_budget: int = 512 << 20) -> Path | None:
    """Merge the parts of `day` (and an earlier day file, if any) into the day file."""
    day_file = kind_dir / f"{day}.parquet"
    leftovers = _already_in(day_file)
    for part in parts_of(kind_dir, day):
        if part.name in leftovers:  # a crash came after the rename, before the deletes
            part.unlink()
    parts = parts_of(kind_dir, day)
    if not parts:
        _remove_empty(kind_dir / day)
        return day_file if day_file.exists() else None
    inputs = ([day_file] if day_file.exists() else []) + parts
    files = [pq.ParquetFile(p) for p in inputs]
    # the rows read, their sorted copy and the Parquet encoder's buffers; with 3, Arrow's
    # peak came to about the budget (tests/test_storage.py, BENCHMARKS.md)
    size = 3 * sum(arrow_bytes(f) for f in files)
    rows = sum(f.metadata.num_rows for f in files)
    metadata = {META_KEY: json.dumps([p.name for p in parts]).encode()}
    tmp = temp_name(day_file)
    try:
        if size <= memory_budget:
            table = _sorted(pa.concat_tables([f.read() for f in files]), kind)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
            pq.write_table(table, tmp, row_group_size=ROW_GROUP, **parquet_options(compression_level, table.schema))
        else:
            _compact_in_buckets(files, tmp, kind, compression_level, buckets=-(-size // memory_budget),
                                metadata=metadata, scratch=kind_dir / f".{day}.compact")
        written = pq.ParquetFile(tmp).metadata.num_rows
        if written != rows:
            raise RuntimeError(f"compaction of {kind_dir}/{day} wrote {written} rows, expected {rows}")
        publish(tmp, day_file)
    finally:
        tmp.unlink(missing_ok=True)
    for part in parts:
        part.unlink()
    _remove_empty(kind_dir / day)
    fsync_dir(kind_dir)
    log.info("compacted %s/%s parts=%d rows=%d bytes=%d", kind_dir, day, len(parts), rows, day_file.stat().st_size)
    return day_file


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _symbol_buckets(files: list[pq.ParquetFile], buckets: int) -> tuple[pa.Array, pa.Array]:
    """(sorted symbols, bucket of each) with about equal rows per bucket."""
    counts: dict[str, int] = {}
    for f in files:
        vc = pc.value_counts(f.read(columns=["symbol"]).column("symbol").combine_chunks())
        for item in vc.to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    symbols = sorted(counts)
    per = max(1, -(-sum(counts.values()) // buckets))
    assignment, acc = [], 0
    for s in symbols:
        assignment.append(min(acc // per, buckets - 1))
        acc += counts[s]
    return pa.array(symbols, pa.string()), pa.array(assignment, pa.int32())


MAX_BUCKETS = 512  # open scratch files at once (a service's file limit is often 1,024)
BATCH_ROWS = 16_384  # rows split at a time in pass 1 (65,536 depth20 rows and their pieces: ~100 MiB)


def _compact_in_buckets(files, tmp: Path, kind: str, level: int, buckets: int,
                        metadata: dict, scratch: Path) -> None:
    """Pass 1 appends each batch's rows to its bucket's scratch file: an Arrow IPC stream
    (LZ4), which keeps no encoder state between writes as a Parquet writer per bucket did
    (77 buckets of 5 minutes of partial depth at 1,500 symbols: 44.3 -> 32.5 s, RSS 735
    -> 652 MiB; BENCHMARKS.md, eighth session). Pass 2 sorts each bucket into the day file."""
    if buckets > MAX_BUCKETS:
        log.warning("compacting %s needs %d buckets to keep its memory budget; capped at %d, so each "
                    "holds more than the budget", tmp, buckets, MAX_BUCKETS)
    symbols, bucket_of = _symbol_buckets(files, min(buckets, MAX_BUCKETS))
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    schema = files[0].schema_arrow
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    try:
        for f in files:
            for batch in f.iter_batches(batch_size=BATCH_ROWS):
                idx = pc.index_in(batch.column("symbol"), value_set=symbols)
                which = pc.take(bucket_of, idx)
                for b in pc.unique(which).to_pylist():
                    if b not in writers:
                        writers[b] = pa.ipc.new_stream(str(scratch / f"bucket-{b}.arrows"), schema, options=options)
                    writers[b].write_batch(batch.filter(pc.equal(which, b)))
            f.close()  # let its reader's buffers go before pass 2
        for w in writers.values():
            w.close()
        done, writers = sorted(writers), {}  # nor keep the closed writers through pass 2
        out_schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
        with pq.ParquetWriter(tmp, out_schema, **parquet_options(level, out_schema)) as out:
            for b in done:
                with pa.OSFile(str(scratch / f"bucket-{b}.arrows")) as source:
                    # one chunk first: `take` would concatenate the chunks itself, on top of both copies
                    table = _sorted(pa.ipc.open_stream(source).read_all().combine_chunks(), kind)
                out.write_table(table.cast(out_schema), row_group_size=ROW_GROUP)
                del table  # before the next bucket is read: one bucket in memory, not two
    finally:
        for w in writers.values():
            try:
                w.close()
            except Exception:
                pass
        shutil.rmtree(scratch, ignore_errors=True)


def finished_days(kind_dir: Path, today: str) -> list[str]:
    if not kind_dir.exists():
        return []
    return sorted(p.name for p in kind_dir.iterdir() if p.is_dir() and _DAY.match(p.name) and p.name < today)


def compact_all(root: Path, compression_level: int, now_us: int, grace_us: int = 0,
                stop: threading.Event | None = None) -> int:
    """Compact every finished day under data_dir (every market and kind); returns days done.

    A day counts as finished `grace_us` after its UTC midnight, so late flushes land first.
    """
    done = 0
    today = day_of(now_us - grace_us)
    for market_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        for kind in KINDS:
            for day in finished_days(market_dir / kind, today):
                if stop is not None and stop.is_set():
                    return done
                if now_us < day_start_us(day) + US_PER_DAY + grace_us:
                    continue
                compact_day(market_dir / kind, day, kind, compression_level)
                done += 1
    return done


class Compactor(threading.Thread):
    """Compacts finished days at start-up and within a minute after each UTC midnight."""

    def __init__(self, root: Path, compression_level: int, stop: threading.Event,
                 now_us: Callable[[], int], grace_s: float, every_s: float = 10.0):
        super().__init__(name="compactor", daemon=True)
        self.root, self.level, self.stop, self.now_us = root, compression_level, stop, now_us
        self.grace_us, self.every_s = int(grace_s * 1e6), every_s
        self.failures = 0

    def run(self) -> None:
        name_os_thread()
        while True:
            try:
                compact_all(self.root, self.level, self.now_us(), self.grace_us, self.stop)
                self.failures = 0
            except Exception:
                self.failures += 1
                log.error("compaction failed (will retry); the parts stay readable", exc_info=True)
            if self.stop.wait(self.every_s * min(30, 1 + self.failures)):
                return
