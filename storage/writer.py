"""The writer thread: publishes the tables a market's processor hands over as part files.

One writer per market (`writer-spot`, `writer-futures`). Items on its queue:

    (kind, table)         rows of one kind, split by the UTC day of their receive time and
                          encoded as they come: each (kind, day) of the open segment is a
                          Parquet file being written, a row group every `ROW_GROUP_ROWS`
                          rows (20-25 times smaller than the Arrow rows), into a `_Sink`:
                          up to `SPILL_BYTES` in memory, then appended to a hidden
                          temporary file in its day folder (`.part-open-N.parquet.tmp`)
    ("segment", name)     the end of a journal segment: each of those files is completed
                          and published as `<kind>/<day>/part-<name>.parquet` (fsync,
                          rename), then the journal segment is deleted, since its rows are
                          now on disk.
    STOP                  write what is left and end.

Why a temporary file and not memory: at 40,000 msgs/s a segment's encoded parts were
~25 MB held in growing buffers (and as much again while each doubled), a tenth of the
process's peak RSS (BENCHMARKS.md, Memory).

A storage error (disk full, folder unwritable) is logged at error level and the encoded
bytes the disk refused are kept in memory and retried every `retry_wait` seconds (those
already in a temporary file stay there: the file is held open, so even a file deleted
under us is read back, not lost; one cut short in place cannot be, so that part is
dropped with a critical line and its journal segment kept); nothing is dropped while
what is held in memory fits in `max_pending_bytes`. Past that bound the oldest segment is dropped with a critical log
line saying exactly how many rows of which kind (its journal segment, if it could be
written, is kept and replayed at the next start).
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from service.threads import FATAL, PipelineThread
from storage.files import US_PER_DAY, day_of, fsync_dir, part_file, part_options
from storage.schemas import DAY_COLUMN

log = logging.getLogger(__name__)

STOP = object()
SEGMENT = "segment"
SPILL_BYTES = 256 << 10  # a part's encoded bytes held in memory before they go to its temporary file
_OPEN = itertools.count(1)  # temporary names, unique in the process
ROW_GROUP_ROWS = 16_384  # rows held as Arrow before they are encoded: 32,768 cost ~45 MiB more at
# 35,000 msgs/s for part files 6 % smaller (day files are re-encoded in larger groups anyway)


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


class PartLost(OSError):
    """A temporary part file changed under the writer in a way its bytes cannot be read back
    from (cut short in place): that part is lost from this run; its journal segment is kept."""


class _Sink:
    """The bytes of one part file as the Parquet writer makes them (a file-like object for
    `pq.ParquetWriter`): up to `SPILL_BYTES` in memory, then appended to `tmp`, a hidden
    temporary file in the part's final folder, held open until `publish` renames it.

    What the disk refuses stays in memory (`held`) and is tried again at the next spill or
    publish: nothing is lost to a storage error. The bytes already in `tmp` are not held in
    memory, but the descriptor is: if the file is deleted under us, they are read back
    through it (`_recover`)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.tail: list[bytes] = []
        self.held = 0      # bytes in `tail`
        self.on_disk = 0   # bytes of `tmp`, written and not refused
        self.closed = False
        self._fd: int | None = None

    # the file-like interface pyarrow writes through
    def write(self, data: bytes | memoryview) -> int:
        self.tail.append(bytes(data))
        self.held += len(data)
        if self.held >= SPILL_BYTES:
            try:
                self.spill()
            except OSError:
                pass  # kept in memory; publish() reports it (and a PartLost), and retries
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    @property
    def size(self) -> int:
        return self.on_disk + self.held

    def spill(self) -> None:
        """Append the memory tail to `tmp`; on OSError the tail stays and the file is cut back
        to what it held, so a retry appends exactly once."""
        if not self.tail:
            return
        if self._fd is not None and self._deleted():
            self._recover()  # its bytes come back into memory, then a new file
        if self._fd is None:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            self.on_disk = 0
        data = b"".join(self.tail) if len(self.tail) > 1 else self.tail[0]
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._fd, memoryview(data)[done:], self.on_disk + done)
        except OSError:
            try:
                os.ftruncate(self._fd, self.on_disk)
            except OSError:
                pass
            self.tail, self.held = [data], len(data)
            raise
        self.on_disk += len(data)
        self.tail, self.held = [], 0

    def _deleted(self) -> bool:
        """Whether the open temporary file was deleted under us (its bytes can be read back);
        PartLost if its size changed (cut short in place: they cannot)."""
        assert self._fd is not None  # the temporary file is open while bytes are on disk
        st = os.fstat(self._fd)
        if st.st_size != self.on_disk:
            raise PartLost(f"temporary part file {self.tmp} changed size under the writer")
        return st.st_nlink == 0

    def _recover(self) -> None:
        chunks, pos = [], 0
        assert self._fd is not None
        while pos < self.on_disk:
            chunk = os.pread(self._fd, min(1 << 24, self.on_disk - pos), pos)
            if not chunk:
                raise PartLost(f"temporary part file {self.tmp} was cut short under the writer")
            chunks.append(chunk)
            pos += len(chunk)
        log.warning("temporary part file %s was removed while being written; %d bytes read back", self.tmp, pos)
        self.tail = chunks + self.tail
        self.held += pos
        self.on_disk = 0
        self.discard()

    def publish(self, final: Path) -> None:
        """Everything onto disk, fsync, rename to `final`, fsync the folder (OSError: retry later)."""
        self.spill()
        if self._fd is None:  # an empty file: nothing was ever written
            raise OSError(f"nothing to publish for {final}")
        os.fsync(self._fd)
        if self._deleted() or os.stat(self.tmp).st_ino != os.fstat(self._fd).st_ino:
            self._recover()  # removed or replaced under us: write it again
            self.spill()
            os.fsync(self._fd)
        os.replace(self.tmp, final)
        self.tmp = final  # a retry after a failed folder fsync renames it onto itself
        fsync_dir(final.parent)
        os.close(self._fd)
        self._fd = None

    def discard(self) -> None:
        """Close and remove the temporary file (a dropped or published-elsewhere part)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


class _Part:
    """One (kind, day) of the open segment: a Parquet file encoded as rows arrive."""

    def __init__(self, schema: pa.Schema, level: int, folder: Path, kind: str):
        self.sink = _Sink(folder / f".part-open-{next(_OPEN)}.parquet.tmp")
        # Parquet writes page by page, header by header (dozens of writes a row group): a
        # native buffer in front hands the Python sink one write per SPILL_BYTES, so the
        # encoding (outside the GIL) rarely has to take the GIL back.
        self.stream = pa.BufferedOutputStream(pa.PythonFile(self.sink, mode="w"), buffer_size=SPILL_BYTES)
        self.writer = pq.ParquetWriter(self.stream, schema, **part_options(level, schema, kind))
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._encode()

    def _encode(self) -> None:
        if self.pending:
            table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
            self.pending, self.pending_rows = [], 0
            self.writer.write_table(table, row_group_size=table.num_rows)

    def finish(self) -> _Sink:
        self._encode()
        self.writer.close()
        self.stream.close()  # what the buffer holds goes to the sink
        return self.sink


@dataclass
class _Segment:
    name: str | None
    files: dict[tuple[str, str], tuple[_Sink, int]]  # (kind, day) -> (its Parquet bytes, rows)
    done: set = field(default_factory=set)  # (kind, day) already published

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (what the disk has not taken yet)."""
        return sum(sink.held for (key, (sink, _)) in self.files.items() if key not in self.done)

    def discard(self) -> None:
        for key, (sink, _) in self.files.items():
            if key not in self.done:
                sink.discard()


class PartWriter(PipelineThread):
    # FATAL: it holds the open part files; their rows are in the journal, which a
    # restarted collector turns into part files (systemd restarts it)
    on_crash = FATAL

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
        self._open: dict[tuple[str, str], _Part] = {}
        self._ready: list[_Segment] = []   # ended segments not yet fully written
        self._anonymous = 0

    def loop(self) -> None:
        while True:
            self.stats.heartbeat = time.monotonic()
            try:
                item = self.inbox.get(timeout=self.retry_wait if self._ready else 1.0)
            except queue.Empty:
                if self._ready:
                    self.write_ready()
                continue
            if item is STOP:
                if self._open:
                    self.end_segment(None)
                self.write_ready(final=True)
                return
            kind, payload = item
            if kind == SEGMENT:
                self.end_segment(payload)
            else:
                self.add(kind, payload)

    def add(self, kind: str, table: pa.Table) -> None:
        for day, rows in split_by_day(table, DAY_COLUMN[kind]).items():
            part = self._open.get((kind, day))
            if part is None:
                part = self._open[(kind, day)] = _Part(table.schema, self.level, self.root / kind / day, kind)
            part.add(rows)

    def end_segment(self, name: str | None) -> None:
        files = {key: (part.finish(), part.rows) for key, part in self._open.items()}
        self._ready.append(_Segment(name, files))
        self._open = {}
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
        for (kind, day), (sink, rows) in seg.files.items():
            if (kind, day) in seg.done:
                continue
            path = self.root / kind / day / part_file(seg.name)
            try:
                sink.publish(path)
            except PartLost as e:
                self._drop(seg, f"{e}; its journal segment is kept and replayed at the next start")
                return True  # gone from the queue; the journal segment is not deleted
            except OSError as e:
                self.stats.errors += 1
                log.error("cannot write %s (%d rows): %s; keeping the rows in memory and retrying every %.0fs",
                          path, rows, e, self.retry_wait)
                return False
            seg.done.add((kind, day))
            self.stats.rows[kind] = self.stats.rows.get(kind, 0) + rows
            self.stats.files += 1
            self.stats.bytes += sink.size
            self.stats.last_write_us = self.now_us()
        self.on_segment_written(seg.name)
        return True

    def _enforce_bound(self, final: bool) -> None:
        pending = sum(s.nbytes for s in self._ready)
        self.stats.pending_bytes = pending
        while self._ready and (pending > self.max_pending_bytes or final):
            seg = self._ready.pop(0)
            pending -= seg.nbytes
            self._drop(seg, ("at shutdown" if final else "memory bound reached")
                       + "; its journal segment, if it was written, is replayed at the next start")
        self.stats.pending_bytes = max(0, pending)

    def _drop(self, seg: _Segment, why: str) -> None:
        """Rows of `seg` not yet published are given up here, loudly, with their counts."""
        lost: dict[str, int] = {}
        for (kind, day), (_, rows) in seg.files.items():
            if (kind, day) not in seg.done:
                lost[kind] = lost.get(kind, 0) + rows
        self.stats.lost_rows += sum(lost.values())
        log.critical("dropping unwritten rows market=%s segment=%s rows=%s (%s)", self.market, seg.name, lost, why)
        seg.discard()
