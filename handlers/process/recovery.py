"""Start-up recovery: replay the journal segments a crash left behind into part files.

Each segment is run through a FrameProcessor in recovery mode (no snapshots requested,
any depth stream routed by its name), and each (kind, day) part file of that segment
that is not on disk yet is written. Then the segment is deleted. Running it twice writes
nothing twice.

Continuity is judged exactly as it was live: segments of one run are replayed through
one processor, in order; a run's first segment records its "start" gaps; a later one
continues from the stream heads of the previous segment's part files, so that a break
right at the boundary is still a gap row.
"""
from __future__ import annotations

import logging
import queue
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from config import MarketConfig
from handlers.ingest.inbox import REST, WS
from handlers.process.processor import FrameProcessor
from storage.files import part_file, write_table_atomic
from storage.journal import WS_RECORD, journal_dir, read_segment, segments
from storage.schemas import DAY_COLUMN
from storage.writer import split_by_day

log = logging.getLogger(__name__)


def recover(cfg: MarketConfig, data_dir: Path, compression_level: int, now_us: Callable[[], int]) -> dict[str, int]:
    """Replay every leftover segment of one market; returns rows written per kind."""
    found = segments(journal_dir(data_dir, cfg.name))
    written: dict[str, int] = {}
    if not found:
        return written

    out: queue.SimpleQueue = queue.SimpleQueue()
    proc: FrameProcessor | None = None
    run = None
    for i, (name, path) in enumerate(found):
        seg_run, counter = name.split("-")
        last_of_run = i + 1 == len(found) or found[i + 1][0].split("-")[0] != seg_run
        if seg_run != run:
            run = seg_run
            proc = FrameProcessor(cfg, None, out, flush_interval=1.0, now_us=now_us, recovering=True)
            if int(counter) > 1:
                _seed(proc, data_dir / cfg.name / "diff_orderbooks", f"{run}-{int(counter) - 1:06d}")
        assert proc is not None  # made at the first segment of each run
        proc.record_start = int(counter) == 1
        records, complete = read_segment(path)
        items = [(WS, *r[1:]) if r[0] == WS_RECORD else (REST, *r[1:]) for r in records]
        proc.handle(items)
        if last_of_run:
            proc.confirm_holes(all_now=True)  # the run ended here: what is still missing is a gap
        proc.build()
        rows = 0
        while not out.empty():
            kind, table = out.get()
            for day, part in split_by_day(table, DAY_COLUMN[kind]).items():
                target = data_dir / cfg.name / kind / day / part_file(name)
                if target.exists():
                    continue  # published before the crash
                write_table_atomic(target, part, compression_level)
                written[kind] = written.get(kind, 0) + part.num_rows
                rows += part.num_rows
        log.info("recovered journal segment market=%s segment=%s items=%d rows_written=%d%s", cfg.name, name,
                 len(items), rows, "" if complete else " (cut short by the crash; complete records kept)")
        path.unlink()
    return written


def _seed(proc: FrameProcessor, kind_dir: Path, previous: str) -> None:
    """Stream heads (last u per symbol) from the part files of the previous segment."""
    for part in kind_dir.glob(f"*/{part_file(previous)}"):
        t = pq.read_table(part, columns=["symbol", "final_update_id"])
        last: dict[str, int] = {}
        for symbol, u in zip(t.column("symbol").to_pylist(), t.column("final_update_id").to_pylist(), strict=True):
            last[symbol] = max(u, last.get(symbol, u))
        for symbol, u in last.items():
            head = proc.continuity.head(symbol)
            if head is None or u > head:
                proc.continuity.seed(symbol, u)
