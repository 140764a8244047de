"""Compaction: a finished day's part files -> one `YYYY-MM-DD.parquet`, rows ordered by
symbol then time, in memory set by a budget whatever the size of the day.

A day within half the budget (as Arrow) is read whole and sorted. A bigger one is
merge-sorted (`_compact_in_runs`): sorted runs of half the budget go to scratch files,
then each symbol group is gathered from every run and sorted into the day file. At 2,000
symbols a day of partial depth is ~600 GB as Arrow and one symbol's day ~600 MB: such a
symbol is sorted in pieces, and runs are merged RUN_FILES at a time. Every row group is
sorted and says so (Parquet `sorting_columns`). The Arrow size is counted from the
files' metadata (`arrow_bytes`), not from their encoded size: part files of partial depth
encode to a third of it.

The running collector never compacts in its own process: `Compactor` starts this module
as a child (`python -m storage.compact`, at nice 10) when a finished day is due, so the
child's memory is not the recorder's and its failure cannot stop recording. One process
compacts a folder at a time (an flock on `.compact.lock`), and none takes the disk's
last `DISK_RESERVE` bytes, which the recorder needs.

Crash safety: the day file is written under a temporary name and published by rename;
it lists the parts it contains in its metadata (`compacted_parts`). Parts are deleted
only after the rename; if a crash comes between the two, the next run sees those parts
named in the day file and deletes them instead of counting their rows twice. Parts
that arrive later for a compacted day (a late flush) are merged into it next time.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from markets import KINDS, MARKETS
from service.helpers import spawn
from service.threads import RESTART, PipelineThread, name_os_thread
from storage.files import day_of, fsync_dir, parquet_options, publish, temp_name
from storage.quality import QUALITY_KIND, delivery_parts_days, write_day_quality
from storage.schemas import SORT_KEYS, exchange_times_in_us

log = logging.getLogger("storage.compact")  # also when run as `python -m storage.compact`

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
META_KEY = b"compacted_parts"
ROW_GROUP = 131_072
MEMORY_BUDGET = 256 << 20  # Arrow's peak while compacting (a run is half of it); config: compact_memory_mb


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
    Compaction)."""
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


class Busy(Exception):
    """Another process is compacting this folder (the service's child and `collector.py
    compact` by hand): it is left to that one."""


def compact_day(kind_dir: Path, day: str, kind: str, compression_level: int,
                memory_budget: int = MEMORY_BUDGET) -> Path | None:
    """Merge the parts of `day` (and an earlier day file, if any) into the day file; one
    process at a time per folder (a lock on `.compact.lock`), else Busy."""
    with open(kind_dir / ".compact.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{kind_dir} is being compacted by another process") from None
        return _compact_day(kind_dir, day, kind, compression_level, memory_budget)  # the lock goes with the file


def _compact_day(kind_dir: Path, day: str, kind: str, compression_level: int, memory_budget: int) -> Path | None:
    day_file = kind_dir / f"{day}.parquet"
    leftovers = _already_in(day_file)
    for part in parts_of(kind_dir, day):
        if part.name in leftovers:  # a crash came after the rename, before the deletes
            part.unlink()
    parts = parts_of(kind_dir, day)
    if not parts:
        _remove_empty(kind_dir / day)
        return day_file if day_file.exists() else None
    _check_space(kind_dir)
    inputs = ([day_file] if day_file.exists() else []) + parts
    files = [pq.ParquetFile(p) for p in inputs]
    rows = sum(f.metadata.num_rows for f in files)
    size = sum(arrow_bytes(f) for f in files)
    metadata = {META_KEY: json.dumps([p.name for p in parts]).encode()}
    tmp = temp_name(day_file)
    try:
        runs = _compact_in_runs(files, rows, size, tmp, kind, compression_level, memory_budget // 2, metadata,
                                scratch=kind_dir / f".{day}.compact")
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
    log.info("compacted %s/%s parts=%d rows=%d bytes=%d runs=%d arrow_mib=%d", kind_dir, day, len(parts), rows,
             day_file.stat().st_size, runs, size >> 20)
    return day_file


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


BATCH_ROWS = 16_384  # rows read at a time (the size of the writers' row groups)
RUN_FILES = 256  # sorted runs merged at once (scratch files open together)
DISK_RESERVE = 2 << 30  # bytes compaction leaves free for the recorder's part files
SCRATCH_ROWS = 4_096  # rows per scratch batch: LZ4 holds a compressed copy of a batch


def _compact_in_runs(files: list[pq.ParquetFile], rows: int, size: int, tmp: Path, kind: str, level: int,
                     run_bytes: int, metadata: dict, scratch: Path) -> int:
    """An external merge sort by symbol then time, in memory set by `run_bytes`. Returns
    the sorted runs made (1: the day was sorted whole, without scratch files). `size` is
    the files' `arrow_bytes`, at or above their real size (tests/test_storage.py).

    Pass 1 reads the rows in the order of the files (the order the parts were written,
    time order), `run_bytes` of Arrow at a time, sorts each run and writes it to a
    scratch file (Arrow IPC, LZ4) cut into symbol groups of about `run_bytes` each.
    Pass 2 takes each group from every run, in run order, sorts it and appends it to the
    day file. A group bigger than `run_bytes` (one symbol's day alone can be) is sorted
    and written in pieces of `run_bytes`, each in time order after the one before when
    the parts are. More than RUN_FILES runs are merged RUN_FILES at a time: the day file
    is then a few such segments one after another in time, each sorted by symbol."""
    schema = exchange_times_in_us(files[0].schema_arrow.empty_table()).schema  # the current version's
    out_schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    made = 0
    with pq.ParquetWriter(tmp, out_schema, sorting_columns=_sorting(kind, out_schema),
                          **parquet_options(level, out_schema)) as out:
        if size <= run_bytes:  # one run: sorted whole, no scratch files
            for run in _runs(files, run_bytes):
                _write_run(out, run, kind, out_schema)
            return 1
        per_row = max(1, size // max(1, rows))
        symbols, group_of = _symbol_groups(files, run_bytes // per_row, min(1.0, RUN_FILES * run_bytes / size))
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            segment: list[tuple[Path, list[tuple[int, int]]]] = []
            for run in _runs(files, run_bytes):
                _check_space(scratch)
                path = scratch / f"run-{made}.arrows"
                segment.append((path, _write_scratch(run, path, kind, symbols, group_of)))
                made += 1
                if len(segment) == RUN_FILES:
                    _merge(segment, out, kind, out_schema, run_bytes)
                    segment = []
            if segment:
                _merge(segment, out, kind, out_schema, run_bytes)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return made


def _runs(files: list[pq.ParquetFile], run_bytes: int) -> Iterator[list[pa.RecordBatch]]:
    """The rows of the files in order, as lists of batches of `run_bytes` of Arrow each
    (a batch that crosses the limit is sliced)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for i, f in enumerate(files):
        for batch in f.iter_batches(batch_size=BATCH_ROWS):
            batch = exchange_times_in_us(batch)  # parts of a version-1 run: ms -> µs
            while held + batch.nbytes > run_bytes:  # the rows that fit close the run
                fit = (run_bytes - held) * batch.num_rows // max(1, batch.nbytes)
                fit = fit or (0 if pending else 1)  # a single row bigger than the run goes alone
                pending.append(batch.slice(0, fit))
                batch = batch.slice(fit)
                yield pending
                pending, held = [], 0
            if batch.num_rows:
                pending.append(batch)
                held += batch.nbytes
        f.close()
        files[i] = None  # a reader keeps the whole file's bytes until dropped
    if pending:
        yield pending


def _symbol_groups(files: list[pq.ParquetFile], group_rows: int, share: float) -> tuple[pa.Array, pa.Array]:
    """(sorted symbols, group of each): consecutive symbols with about `group_rows` rows
    in a segment (`share` of the day) per group."""
    counts: dict[str, int] = {}
    for f in files:
        vc = pc.value_counts(f.read(columns=["symbol"]).column("symbol").combine_chunks())
        for item in vc.to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    names = sorted(counts)
    groups: list[int] = []
    group, acc = 0, 0.0
    for name in names:
        expected = counts[name] * share
        if acc and acc + expected > group_rows:
            group, acc = group + 1, 0
        groups.append(group)
        acc += expected
    return pa.array(names, pa.string()), pa.array(groups, pa.int32())


def _sorted_table(pending: list[pa.RecordBatch], kind: str, schema: pa.Schema) -> pa.Table:
    """The rows held, sorted, as one chunk; empties `pending`. Column by column: each is
    joined into one array and put in order, and its unsorted chunks are let go before the
    next, so that the rows are held about once, not three times (chunks, joined, sorted)."""
    table = pa.Table.from_batches(pending, schema=pending[0].schema)
    pending.clear()
    order = pc.sort_indices(table, sort_keys=_order(kind))
    columns = table.columns
    del table
    for i, column in enumerate(columns):
        columns[i] = None  # drop each column's chunks as soon as it is taken
        columns[i] = column.combine_chunks().take(order)
        del column
    return pa.Table.from_arrays(columns, schema=schema)


def _write_run(out: pq.ParquetWriter, pending: list[pa.RecordBatch], kind: str, schema: pa.Schema) -> None:
    out.write_table(_sorted_table(pending, kind, schema), row_group_size=ROW_GROUP)


def _write_scratch(run: list[pa.RecordBatch], path: Path, kind: str, symbols: pa.Array,
                   group_of: pa.Array) -> list[tuple[int, int]]:
    """A run sorted into a scratch file, symbol group after symbol group; returns (group,
    rows) of each, in order."""
    table = _sorted_table(run, kind, run[0].schema)
    groups = pc.take(group_of, pc.index_in(table.column("symbol"), value_set=symbols))
    index, at = [], 0
    with pa.ipc.new_stream(str(path), table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        for item in pc.value_counts(groups).to_pylist():  # groups ascend with the symbols
            n = item["counts"]
            # zero-copy slices of the sorted columns, compressed a few MiB at a time
            w.write_table(table.slice(at, n), max_chunksize=SCRATCH_ROWS)
            index.append((item["values"], n))
            at += n
    return index


def _merge(segment: list[tuple[Path, list[tuple[int, int]]]], out: pq.ParquetWriter, kind: str,
           schema: pa.Schema, run_bytes: int) -> None:
    """Each symbol group from every run of the segment, in run order, sorted into `out`."""
    handles = [pa.OSFile(str(path)) for path, _ in segment]
    sources = [pa.ipc.open_stream(handle) for handle in handles]
    queues = [collections.deque(index) for _, index in segment]
    try:
        for group in sorted({g for _, index in segment for g, _ in index}):
            pending: list[pa.RecordBatch] = []
            held = 0
            for source, queue in zip(sources, queues, strict=True):
                if queue and queue[0][0] == group:
                    _, rows = queue.popleft()
                    while rows > 0:
                        batch = source.read_next_batch()
                        rows -= batch.num_rows
                        if pending and held + batch.nbytes > run_bytes:  # a group bigger than a run: in pieces
                            _write_run(out, pending, kind, schema)
                            held = 0
                        pending.append(batch)
                        held += batch.nbytes
            if pending:
                _write_run(out, pending, kind, schema)
            _check_space(segment[0][0].parent)
    finally:
        for handle in handles:
            handle.close()
        for path, _ in segment:
            path.unlink(missing_ok=True)


def _check_space(folder: Path) -> None:
    """Scratch files and the day file share the disk with the recorder: stop (the parts
    stay, the scratch files go) rather than take its last `DISK_RESERVE` bytes."""
    free = shutil.disk_usage(folder).free
    if free < DISK_RESERVE:
        raise OSError(errno.ENOSPC, f"compaction stopped: {free >> 20} MiB free on the disk of {folder}, "
                                    f"under the {DISK_RESERVE >> 20} MiB kept for recording")


def _order(kind: str) -> list[tuple[str, str]]:
    return [(k, "ascending") for k in SORT_KEYS[kind]]


def _sorting(kind: str, schema: pa.Schema) -> list[pq.SortingColumn]:
    """Parquet's own record that each row group is sorted by `_order`."""
    return pq.SortingColumn.from_ordering(schema, _order(kind))


def finished_days(kind_dir: Path, today: str) -> list[str]:
    if not kind_dir.exists():
        return []
    return sorted(p.name for p in kind_dir.iterdir() if p.is_dir() and _DAY.match(p.name) and p.name < today)


def due_days(root: Path, now_us: int, grace_us: int = 0) -> list[tuple[Path, str, str]]:
    """(folder, day, kind) of every finished day still held as parts, in every market and
    kind. A day counts as finished `grace_us` after its UTC midnight, so late flushes land
    first."""
    due = []
    today = day_of(now_us - grace_us)
    for market_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        for kind in KINDS:
            for day in finished_days(market_dir / kind, today):
                if parts_of(market_dir / kind, day):  # days before day_of(now - grace): ended grace_us ago
                    due.append((market_dir / kind, day, kind))
    return due


class CompactionFailed(Exception):
    """Some days could not be compacted (each logged with its cause); their parts stay."""

    def __init__(self, days: list[str]):
        super().__init__(f"compaction failed for {len(days)} day(s): {', '.join(days)}; their parts stay readable")
        self.days = days


def compact_all(root: Path, compression_level: int, now_us: int, grace_us: int = 0,
                memory_budget: int = MEMORY_BUDGET) -> int:
    """Compact every finished day under data_dir (every market and kind); returns days done.
    A day that fails is logged and the others are done; then CompactionFailed names it."""
    done, failed = 0, []
    touched: dict[tuple[Path, str], None] = {}
    for kind_dir, day, kind in due_days(root, now_us, grace_us):
        try:
            compact_day(kind_dir, day, kind, compression_level, memory_budget)
        except Busy as e:
            log.warning("%s; %s left to it", e, day)
            continue
        except Exception:  # one bad day (logged with its traceback) must not hold up the others
            log.error("compaction of %s/%s failed; its parts stay as they are", kind_dir, day, exc_info=True)
            failed.append(f"{kind_dir.parent.name}/{kind_dir.name}/{day}")
            continue
        touched[(kind_dir.parent, day)] = None
        done += 1
    today = day_of(now_us - grace_us)
    for market_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        for day in delivery_parts_days(market_dir):  # counts not folded in yet (a crash, a failed record)
            if day < today and (market_dir / "diff_orderbooks" / f"{day}.parquet").exists():
                touched.setdefault((market_dir, day), None)
    for market_dir, day in touched:
        market = MARKETS.get(market_dir.name)
        if market is None or any(parts_of(market_dir / kind, day) for kind in KINDS):
            continue  # not a market's folder, or a kind of the day still in parts (busy, failed)
        try:
            path = write_day_quality(market_dir, day, market.chains_by_pu, compression_level)
            log.info("quality %s", path)
        except Exception:  # the day's data is whole; its record is missing, and said so
            log.error("the quality record of %s/%s failed", market_dir, day, exc_info=True)
            failed.append(f"{market_dir.name}/{QUALITY_KIND}/{day}")
    if failed:
        raise CompactionFailed(failed)
    return done


NICE = 10  # the compaction child's CPU priority, below the recorder's


class Compactor(PipelineThread):
    """Compacts finished days at start-up and within a minute after each UTC midnight, in a
    child process (`python -m storage.compact`) started only when a day is due, at a lower
    CPU priority. The child's memory (about the budget) is never the recorder's, and its
    failure or death leaves the recorder running: the parts stay readable, and the day is
    tried again, later each time (up to 30 rounds of `every_s`)."""

    # RESTART: it holds nothing between rounds (each lists the day folders afresh); a
    # crash costs a round, and recording goes on
    on_crash = RESTART

    def __init__(self, root: Path, compression_level: int, stop: threading.Event,
                 now_us: Callable[[], int], grace_s: float, every_s: float = 10.0,
                 memory_budget: int = MEMORY_BUDGET):
        super().__init__(name="compactor", daemon=True)
        self.root, self.level, self.stop, self.now_us = root, compression_level, stop, now_us
        self.grace_us, self.every_s, self.memory_budget = int(grace_s * 1e6), every_s, memory_budget
        self.failures = 0  # in a row, for the back-off and the metrics
        self.runs = {"ok": 0, "failed": 0, "stopped": 0}  # child processes, by outcome

    def loop(self) -> None:
        while True:
            now = self.now_us()
            code: int | str  # the child's exit status, or why it could not run
            try:
                due = due_days(self.root, now, self.grace_us)
                code = self._child(now) if due else 0
            except OSError as e:  # the listing, or the child could not start
                code = f"{type(e).__name__}: {e}"
            if code == 0:
                self.failures = 0
                self.runs["ok"] += bool(due)
            elif code in (-signal.SIGTERM, 128 + signal.SIGTERM) or self.stop.is_set():  # systemd stops the unit
                log.info("compaction stopped (exit %s); it resumes at the next start", code)
                self.runs["stopped"] += 1
            else:
                self.runs["failed"] += 1
                self.failures += 1
                log.error("compaction failed (exit %s); will retry, the parts stay readable", code)
            if self.stop.wait(self.every_s * min(30, 1 + self.failures)):
                return

    def _child(self, now: int) -> int:
        # a helper process (service.helpers): its lines go to the collector's journal; on
        # SIGTERM (systemd's stop reaches it too) it unwinds and removes its temporary file
        child = spawn("storage.compact", [str(self.root), "--level", str(self.level), "--now-us", str(now),
                                          "--grace-us", str(self.grace_us), "--budget-mib", str(self.memory_budget >> 20),
                                          "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel())])
        log.info("compaction started pid=%d", child.pid)
        while child.poll() is None:
            if self.stop.wait(0.5):
                child.terminate()  # crash-safe: the parts stay until their day file is published
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                return -signal.SIGTERM
        return child.returncode



def main(argv: list[str] | None = None) -> int:
    """The compaction child: compact what is due at the parent's clock, then exit."""
    import argparse
    import os

    from service.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m storage.compact", description=main.__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--level", type=int, required=True, help="ZSTD level of the day files")
    parser.add_argument("--now-us", type=int, required=True, help="the parent's clock, µs since the epoch")
    parser.add_argument("--grace-us", type=int, default=0)
    parser.add_argument("--budget-mib", type=int, default=MEMORY_BUDGET >> 20)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    threading.current_thread().name = "compactor"
    name_os_thread("compactor")

    def on_term(signum: int, frame: object) -> None:  # unwind, so that the temporary day file is removed
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        os.nice(NICE)
    except OSError as e:  # a seccomp filter may refuse it; compaction runs all the same
        log.warning("compaction runs at the collector's CPU priority: nice refused (%s)", e)
    log.info("compaction child pid=%d nice=%d budget_mib=%d", os.getpid(), os.nice(0), args.budget_mib)
    try:
        done = compact_all(args.data_dir, args.level, args.now_us, args.grace_us, memory_budget=args.budget_mib << 20)
    except CompactionFailed as e:
        log.error("%s", e)
        return 1
    log.info("compaction done days=%d", done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
