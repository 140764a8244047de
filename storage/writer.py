"""The writer thread: publishes the tables a market's processor hands over as part files.

One writer per market (`writer-spot`, `writer-futures`). Items on its queue:

    (kind, table)         rows of one kind, accumulated (as Arrow, compact) until ...
    ("segment", name)     ... the end of a journal segment: every accumulated table is
                          written as `<kind>/<day>/part-<name>.parquet` (rows split by the
                          UTC day of their receive time), then the journal segment is
                          deleted, since its rows are now on disk.
    STOP                  write what is left and end.

A storage error (disk full, folder unwritable) is logged at error level and the tables
are kept and retried every `retry_wait` seconds; nothing is dropped while they fit in
`max_pending_bytes`. Past that bound the oldest segment's tables are dropped with a
critical log line saying exactly how many rows of which kind (its journal segment, if it
could be written, is kept and replayed at the next start).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from service.threads import name_os_thread
from storage.files import US_PER_DAY, day_of, write_table_atomic
from storage.schemas import DAY_COLUMN

log = logging.getLogger(__name__)

STOP = object()
SEGMENT = "segment"


@dataclass
class WriteStats:
    rows: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    errors: int = 0
    lost_rows: int = 0
    pending_bytes: int = 0
    last_write_us: int = 0
    heartbeat: float = 0.0  # monotonic time of the loop's last turn (watchdog)


def split_by_day(table: pa.Table, column: str) -> dict[str, pa.Table]:
    """Rows grouped by the UTC day of `column` (a µs timestamp); order kept."""
    if table.num_rows == 0:
        return {}
    times = table.column(column)
    lo, hi = (v.as_py() for v in pc.min_max(times).values())
    first, last = lo // US_PER_DAY, hi // US_PER_DAY
    if first == last:
        return {day_of(lo): table}
    days = pc.divide(times, pa.scalar(US_PER_DAY, pa.int64()))
    out = {}
    for d in range(first, last + 1):
        part = table.filter(pc.equal(days, d))
        if part.num_rows:
            out[day_of(d * US_PER_DAY)] = part
    return out


@dataclass
class _Segment:
    name: str | None
    tables: dict[str, list[pa.Table]]  # kind -> tables
    done: set = field(default_factory=set)  # (kind, day) already published

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for ts in self.tables.values() for t in ts)


class PartWriter(threading.Thread):
    def __init__(self, market: str, data_dir: Path, inbox: queue.Queue, compression_level: int,
                 on_segment_written: Callable[[str], None] = lambda name: None,
                 now_us: Callable[[], int] = lambda: 0,
                 retry_wait: float = 5.0, max_pending_bytes: int = 1 << 30):
        super().__init__(name=f"writer-{market}", daemon=True)
        self.market, self.root = market, data_dir / market
        self.inbox, self.level, self.retry_wait = inbox, compression_level, retry_wait
        self.on_segment_written, self.now_us = on_segment_written, now_us
        self.max_pending_bytes = max_pending_bytes
        self.stats = WriteStats()
        self._open: dict[str, list[pa.Table]] = defaultdict(list)
        self._ready: list[_Segment] = []   # ended segments not yet fully written
        self._anonymous = 0

    def run(self) -> None:
        name_os_thread()
        try:
            self._loop()
        except Exception:
            log.critical("writer crashed market=%s", self.market, exc_info=True)
            raise

    def _loop(self) -> None:
        while True:
            self.stats.heartbeat = time.monotonic()
            try:
                item = self.inbox.get(timeout=self.retry_wait if self._ready else 1.0)
            except queue.Empty:
                if self._ready:
                    self.write_ready()
                continue
            if item is STOP:
                if any(self._open.values()):
                    self.end_segment(None)
                self.write_ready(final=True)
                return
            kind, payload = item
            if kind == SEGMENT:
                self.end_segment(payload)
            else:
                self._open[kind].append(payload)

    def end_segment(self, name: str | None) -> None:
        self._ready.append(_Segment(name, dict(self._open)))
        self._open = defaultdict(list)
        self.write_ready()

    def write_ready(self, final: bool = False) -> None:
        for _ in range(3 if final else 1):
            while self._ready and self._write_segment(self._ready[0]):
                self._ready.pop(0)
            if not self._ready:
                break
        self._enforce_bound(final)

    def _write_segment(self, seg: _Segment) -> bool:
        if seg.name is None:
            self._anonymous += 1
            seg.name = f"{self.now_us()}-x{self._anonymous:06d}"
        for kind, tables in seg.tables.items():
            if not tables:
                continue
            table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            for day, part in split_by_day(table, DAY_COLUMN[kind]).items():
                if (kind, day) in seg.done:
                    continue
                path = self.root / kind / day / f"part-{seg.name}.parquet"
                try:
                    write_table_atomic(path, part, self.level)
                except OSError as e:
                    self.stats.errors += 1
                    log.error("cannot write %s (%d rows): %s; keeping the rows in memory and retrying every %.0fs",
                              path, part.num_rows, e, self.retry_wait)
                    return False
                seg.done.add((kind, day))
                self.stats.rows[kind] = self.stats.rows.get(kind, 0) + part.num_rows
                self.stats.files += 1
                self.stats.bytes += path.stat().st_size
                self.stats.last_write_us = self.now_us()
        self.on_segment_written(seg.name)
        return True

    def _enforce_bound(self, final: bool) -> None:
        pending = sum(s.nbytes for s in self._ready)
        self.stats.pending_bytes = pending
        while self._ready and (pending > self.max_pending_bytes or final):
            seg = self._ready.pop(0)
            lost = {k: sum(t.num_rows for t in ts) for k, ts in seg.tables.items() if ts}
            self.stats.lost_rows += sum(lost.values())
            log.critical("dropping unwritten rows market=%s segment=%s rows=%s (%s); its journal segment, "
                         "if it was written, is replayed at the next start",
                         self.market, seg.name, lost, "at shutdown" if final else "memory bound reached")
            pending -= seg.nbytes
        self.stats.pending_bytes = max(0, pending)
