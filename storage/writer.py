"""The writer thread: turns tables handed over by a market's processor into part files.

One writer per market (`writer-spot`, `writer-futures`). Each item on its queue is
`(kind, table)`; rows are split by the UTC day of their receive time and written as
one atomic part file per (kind, day). A storage error is logged at error level and
the table kept for the next attempt, so a full disk never loses what is in memory;
the processor's queue bound keeps that memory finite.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from storage.files import US_PER_DAY, day_of, write_table_atomic
from storage.schemas import DAY_COLUMN

log = logging.getLogger(__name__)

STOP = object()


@dataclass
class WriteStats:
    rows: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    errors: int = 0


def split_by_day(table: pa.Table, column: str) -> dict[str, pa.Table]:
    """Rows grouped by the UTC day of `column` (a µs timestamp); order kept."""
    if table.num_rows == 0:
        return {}
    times = table.column(column)
    lo, hi = pc.min_max(times).values()
    first, last = lo.as_py() // US_PER_DAY, hi.as_py() // US_PER_DAY
    if first == last:
        return {day_of(lo.as_py()): table}
    days = pc.divide(times, pa.scalar(US_PER_DAY, pa.int64()))
    return {
        day_of(d * US_PER_DAY): table.filter(pc.equal(days, d))
        for d in range(first, last + 1)
        if pc.any(pc.equal(days, d)).as_py()
    }


class PartWriter(threading.Thread):
    def __init__(self, market: str, data_dir: Path, inbox: queue.Queue, compression_level: int,
                 retry_wait: float = 5.0):
        super().__init__(name=f"writer-{market}", daemon=True)
        self.market, self.root = market, data_dir / market
        self.inbox, self.level, self.retry_wait = inbox, compression_level, retry_wait
        self.stats = WriteStats()
        self._seq = 0
        self._pending: list[tuple[str, str, pa.Table]] = []

    def run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.critical("writer crashed market=%s", self.market, exc_info=True)
            raise

    def _loop(self) -> None:
        while True:
            try:
                item = self.inbox.get(timeout=self.retry_wait if self._pending else None)
            except queue.Empty:
                self._write_pending()
                continue
            if item is STOP:
                self._write_pending(final=True)
                return
            kind, table = item
            for day, part in split_by_day(table, DAY_COLUMN[kind]).items():
                self._pending.append((kind, day, part))
            self._write_pending()

    def _write_pending(self, final: bool = False) -> None:
        attempts = 3 if final else 1
        for _ in range(attempts):
            while self._pending:
                kind, day, table = self._pending[0]
                try:
                    self._write(kind, day, table)
                except OSError as e:
                    self.stats.errors += 1
                    log.error("cannot write part market=%s kind=%s day=%s rows=%d error=%s; "
                              "keeping it in memory and retrying", self.market, kind, day, table.num_rows, e)
                    break
                self._pending.pop(0)
            if not self._pending:
                return
        if final and self._pending:
            lost = sum(t.num_rows for _, _, t in self._pending)
            log.critical("giving up at shutdown market=%s: %d rows could not be written", self.market, lost)

    def _write(self, kind: str, day: str, table: pa.Table) -> None:
        self._seq += 1
        first = table.column(DAY_COLUMN[kind])[0].as_py()
        path = self.root / kind / day / f"part-{first:016d}-{self._seq:06d}.parquet"
        write_table_atomic(path, table, self.level)
        self.stats.rows[kind] = self.stats.rows.get(kind, 0) + table.num_rows
        self.stats.files += 1
        self.stats.bytes += path.stat().st_size
