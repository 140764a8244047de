"""Part files, day split at UTC midnight, and compaction in bounded memory."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import compact, writer
from storage.compact import META_KEY, arrow_bytes, compact_all, compact_day
from storage.files import US_PER_DAY, clean_temp_files, day_start_us, write_table_atomic
from storage.schemas import SCHEMAS, SORT_KEYS
from storage.writer import ROW_GROUP_ROWS, STOP, PartWriter, split_by_day
from tests.helpers import ROOT

MIDNIGHT = day_start_us("2026-11-25")


def depth_table(rows: list[tuple[str, int, int]]) -> pa.Table:
    """rows of (symbol, received_time, final_update_id)"""
    n = len(rows)
    return pa.table({
        "received_time": [r[1] for r in rows], "event_time": [r[1] - 3000 for r in rows],
        "symbol": [r[0] for r in rows], "first_update_id": [r[2] for r in rows],
        "final_update_id": [r[2] for r in rows], "prev_final_update_id": [None] * n,
        "transaction_time": [None] * n, "bid_prices": [[1.0, 0.5]] * n, "bid_sizes": [[2.0, 3.0]] * n,
        "ask_prices": [[1.5]] * n, "ask_sizes": [[4.0]] * n,
    }, schema=SCHEMAS["diff_orderbooks"])


def test_split_by_day_at_midnight():
    t = depth_table([("A", MIDNIGHT - 2, 1), ("A", MIDNIGHT - 1, 2), ("A", MIDNIGHT, 3), ("B", MIDNIGHT + 5, 4)])
    parts = split_by_day(t, "received_time")
    assert {d: p.column("final_update_id").to_pylist() for d, p in parts.items()} == {
        "2026-11-24": [1, 2], "2026-11-25": [3, 4]}


def test_writer_puts_rows_in_the_day_of_their_receive_time(tmp_path):
    q: queue.Queue = queue.Queue()
    w = PartWriter("spot", tmp_path, q, compression_level=9)
    w.start()
    q.put(("diff_orderbooks", depth_table([("A", MIDNIGHT - 1, 1), ("A", MIDNIGHT + 1, 2)])))
    q.put(STOP)
    w.join(10)
    kind_dir = tmp_path / "spot" / "diff_orderbooks"
    before, after = (list((kind_dir / d).glob("part-*.parquet")) for d in ("2026-11-24", "2026-11-25"))
    assert len(before) == len(after) == 1
    assert pq.read_table(before[0]).column("final_update_id").to_pylist() == [1]
    meta = pq.ParquetFile(after[0]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert w.stats.rows == {"diff_orderbooks": 2}
    assert not list(tmp_path.rglob("*.tmp"))


def test_writer_encodes_rows_as_they_arrive_and_publishes_them_at_the_segment_end(tmp_path):
    """A segment's rows are held as Parquet (row groups of ROW_GROUP_ROWS) rather than as
    Arrow tables, and the published part file has every row, in order."""
    q: queue.Queue = queue.Queue()
    w = PartWriter("spot", tmp_path, q, compression_level=9)
    n = ROW_GROUP_ROWS * 5 // 8  # two tables make a row group, the third waits
    tables = [depth_table([("A", MIDNIGHT + 1000 * (i * n + k), i * n + k) for k in range(n)]) for i in range(3)]
    for t in tables:
        w.add("diff_orderbooks", t)
    part = w._open[("diff_orderbooks", "2026-11-25")]
    assert part.rows == 3 * n and part.pending_rows == n  # 2n already encoded
    assert part.sink.tell() < (tables[0].nbytes + tables[1].nbytes) / 5  # the encoded 2n rows
    w.end_segment("1-000001")
    files = list((tmp_path / "spot" / "diff_orderbooks" / "2026-11-25").glob("part-*.parquet"))
    assert [f.name for f in files] == ["part-1-000001.parquet"]
    f = pq.ParquetFile(files[0])
    assert f.metadata.num_row_groups == 2
    assert f.read().column("final_update_id").to_pylist() == list(range(3 * n))
    assert w.stats.rows == {"diff_orderbooks": 3 * n} and not w._ready and not w._open


def two_row_groups(n):
    return [depth_table([("A", MIDNIGHT + 1000 * (i * n + k), i * n + k) for k in range(n)]) for i in range(2)]


def test_writer_spills_encoded_bytes_to_a_hidden_temporary_file(tmp_path, monkeypatch):
    """Past SPILL_BYTES a part's encoded bytes leave memory for `.part-open-N.parquet.tmp`
    in its day folder (which no reader's `*.parquet` glob sees); the segment end renames it."""
    monkeypatch.setattr(writer, "SPILL_BYTES", 512)
    w = PartWriter("spot", tmp_path, queue.Queue(), compression_level=9)
    n = ROW_GROUP_ROWS
    for t in two_row_groups(n):
        w.add("diff_orderbooks", t)
    day = tmp_path / "spot" / "diff_orderbooks" / "2026-11-25"
    sink = w._open[("diff_orderbooks", "2026-11-25")].sink
    (tmp,) = day.glob(".part-open-*.parquet.tmp")
    assert sink.on_disk == tmp.stat().st_size > 512 and sink.held < 512
    assert not list(day.glob("*.parquet"))
    w.end_segment("1-000001")
    assert [p.name for p in day.iterdir()] == ["part-1-000001.parquet"]
    assert pq.read_table(day / "part-1-000001.parquet").column("final_update_id").to_pylist() == list(range(2 * n))
    assert w.stats.bytes == (day / "part-1-000001.parquet").stat().st_size


def test_a_temporary_file_removed_under_the_writer_is_read_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(writer, "SPILL_BYTES", 512)
    w = PartWriter("spot", tmp_path, queue.Queue(), compression_level=9)
    n = ROW_GROUP_ROWS
    first, second = two_row_groups(n)
    w.add("diff_orderbooks", first)
    day = tmp_path / "spot" / "diff_orderbooks" / "2026-11-25"
    for tmp in day.glob("*.tmp"):
        tmp.unlink()  # an operator's clean-up, a stray script
    w.add("diff_orderbooks", second)
    w.end_segment("1-000001")
    assert "was removed while being written" in caplog.text
    assert pq.read_table(day / "part-1-000001.parquet").column("final_update_id").to_pylist() == list(range(2 * n))
    assert not list(day.glob("*.tmp"))


def test_bytes_the_disk_refuses_stay_in_memory_until_it_takes_them(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(writer, "SPILL_BYTES", 512)
    w = PartWriter("spot", tmp_path, queue.Queue(), compression_level=9)
    day = tmp_path / "spot" / "diff_orderbooks" / "2026-11-25"
    day.parent.mkdir(parents=True)
    day.write_text("a file where the day folder goes")  # every write below it fails (ENOTDIR)
    n = ROW_GROUP_ROWS
    for t in two_row_groups(n):
        w.add("diff_orderbooks", t)
    w.end_segment("1-000001")
    assert "cannot write" in caplog.text
    assert len(w._ready) == 1 and w._ready[0].nbytes > 512 and w.stats.pending_bytes == w._ready[0].nbytes
    day.unlink()
    w.write_ready()
    assert not w._ready and w.stats.pending_bytes == 0
    assert pq.read_table(day / "part-1-000001.parquet").column("final_update_id").to_pylist() == list(range(2 * n))
    assert [p.name for p in day.iterdir()] == ["part-1-000001.parquet"]


def make_parts(kind_dir, day, n_parts, rows_per_part, symbols, seed=1):
    rng = random.Random(seed)
    start = day_start_us(day)
    t, uid, expected = start + 1000, 0, []
    for i in range(n_parts):
        rows = []
        for _ in range(rows_per_part):
            t += rng.randrange(1, 1000)
            uid += 1
            rows.append((rng.choice(symbols), t, uid))
        rows.sort()
        expected += rows
        write_table_atomic(kind_dir / day / f"part-{t:016d}-{i:06d}.parquet", depth_table(rows), 3)
    return expected


def rows_of(table: pa.Table) -> list[tuple]:
    return list(zip(table.column("symbol").to_pylist(), table.column("received_time").to_pylist(),
                    table.column("final_update_id").to_pylist(), strict=True))


def assert_sorted_runs(path: Path, kind: str = "diff_orderbooks") -> int:
    """Every row group sorted by the kind's keys, and declared so in its metadata; returns
    the row groups."""
    f = pq.ParquetFile(path)
    keys = SORT_KEYS[kind]
    for i in range(f.metadata.num_row_groups):
        group = f.read_row_group(i, columns=keys)
        assert group.equals(group.sort_by([(k, "ascending") for k in keys])), i
        declared = f.metadata.row_group(i).sorting_columns
        assert [f.schema_arrow.names[c.column_index] for c in declared] == keys
        assert not any(c.descending for c in declared)
    return f.metadata.num_row_groups


def test_compaction_of_a_day_within_the_budget_sorts_it_whole(tmp_path):
    kind_dir = tmp_path / "spot" / "diff_orderbooks"
    symbols = [f"S{i:02d}USDT" for i in range(12)]
    expected = make_parts(kind_dir, "2026-11-24", 7, 300, symbols)
    out = compact_day(kind_dir, "2026-11-24", "diff_orderbooks", 9)
    assert out == kind_dir / "2026-11-24.parquet"
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == SCHEMAS["diff_orderbooks"]
    assert rows_of(table) == sorted(expected)
    assert assert_sorted_runs(out) == 1
    assert not (kind_dir / "2026-11-24").exists()
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("symbols", [[f"S{i:02d}USDT" for i in range(12)], ["BTCUSDT"]])
def test_compaction_past_the_budget_merges_sorted_runs_into_one_order(tmp_path, caplog, symbols):
    """Sorted runs of half the budget through scratch files, merged by symbol group: the day
    file is in one order, symbol then time, also when one symbol's day is bigger than a run;
    every row once, no scratch file left."""
    kind_dir = tmp_path / "spot" / "diff_orderbooks"
    expected = make_parts(kind_dir, "2026-11-24", 7, 300, symbols)
    caplog.set_level(logging.INFO)
    out = compact_day(kind_dir, "2026-11-24", "diff_orderbooks", 9, memory_budget=60_000)
    runs = int(re.search(r"compacted \S+ parts=7 rows=2100 bytes=\d+ runs=(\d+)", caplog.text).group(1))
    assert runs >= 4
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == SCHEMAS["diff_orderbooks"]
    assert rows_of(table) == sorted(expected)
    assert assert_sorted_runs(out) >= 1
    assert not (kind_dir / "2026-11-24").exists()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*.compact"))


def test_compaction_past_the_merge_width_writes_sorted_segments_in_time_order(tmp_path, caplog, monkeypatch):
    """More runs than are merged at once: the day file is segments one after another, each
    the next rows read (the parts in the order written), sorted by symbol then time."""
    monkeypatch.setattr(compact, "RUN_FILES", 2)
    kind_dir = tmp_path / "spot" / "diff_orderbooks"
    expected = make_parts(kind_dir, "2026-11-24", 7, 300, [f"S{i:02d}USDT" for i in range(12)])
    caplog.set_level(logging.INFO)
    out = compact_day(kind_dir, "2026-11-24", "diff_orderbooks", 9, memory_budget=60_000)
    runs = int(re.search(r"runs=(\d+)", caplog.text).group(1))
    got = rows_of(pq.read_table(out))
    assert_sorted_runs(out)
    segments, at, pending = 0, 0, Counter()
    for i, row in enumerate(got):  # cut `got` where it holds exactly the next rows read, sorted
        pending[row] += 1
        pending[expected[i]] -= 1
        if not +pending and not -pending:
            assert got[at:i + 1] == sorted(expected[at:i + 1])
            segments, at = segments + 1, i + 1
    assert at == len(got) == len(expected)
    assert segments >= -(-runs // 2) >= 2


def test_late_parts_are_merged_and_crash_leftovers_not_counted_twice(tmp_path):
    kind_dir = tmp_path / "futures" / "diff_orderbooks"
    day = "2026-11-24"
    first = make_parts(kind_dir, day, 3, 50, ["A", "B"], seed=1)
    names = [p.name for p in sorted((kind_dir / day).iterdir())]
    compact_day(kind_dir, day, "diff_orderbooks", 9)
    assert json.loads(pq.read_schema(kind_dir / f"{day}.parquet").metadata[META_KEY]) == names
    # simulate a crash after the rename and before the deletes: the parts come back
    leftover = make_parts(tmp_path / "copy", day, 3, 50, ["A", "B"], seed=1)
    assert leftover == first
    (kind_dir / day).mkdir()
    for p in (tmp_path / "copy" / day).iterdir():
        p.rename(kind_dir / day / p.name)
    # and a genuinely late part arrives too
    late = [("A", day_start_us(day) + US_PER_DAY - 5, 10_000)]
    write_table_atomic(kind_dir / day / "part-9999999999999999-000009.parquet", depth_table(late), 3)
    compact_day(kind_dir, day, "diff_orderbooks", 9)
    table = pq.read_table(kind_dir / f"{day}.parquet")
    assert table.num_rows == len(first) + 1
    assert sorted(table.column("final_update_id").to_pylist()) == sorted([r[2] for r in first] + [10_000])


def test_compact_all_leaves_today_and_the_grace_period_alone(tmp_path):
    for day in ("2026-11-23", "2026-11-24"):
        make_parts(tmp_path / "spot" / "diff_orderbooks", day, 2, 10, ["A"])
    now = day_start_us("2026-11-25") + 10_000_000  # 00:00:10
    assert compact_all(tmp_path, 9, now, grace_us=30_000_000) == 1  # 24th waits for the grace
    assert (tmp_path / "spot" / "diff_orderbooks" / "2026-11-23.parquet").exists()
    assert (tmp_path / "spot" / "diff_orderbooks" / "2026-11-24").is_dir()
    assert compact_all(tmp_path, 9, now + 30_000_000, grace_us=30_000_000) == 1
    assert (tmp_path / "spot" / "diff_orderbooks" / "2026-11-24.parquet").exists()


def test_temporaries_left_by_a_crash_are_removed(tmp_path):
    tmp = tmp_path / "spot" / "gaps" / "2026-11-24" / ".part-1.parquet.tmp"
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"half a file")
    assert clean_temp_files(tmp_path) == [tmp]
    assert not tmp.exists()


def test_a_temporary_file_cut_short_under_the_writer_is_dropped_loudly_and_left_to_the_journal(
        tmp_path, monkeypatch, caplog):
    """Truncated in place, its bytes cannot be read back: the part is not published as a
    corrupt file; the loss is a critical line with the row count, the journal segment is
    kept (not reported written), and the next segment is published as usual."""
    monkeypatch.setattr(writer, "SPILL_BYTES", 512)
    written: list[str] = []
    w = PartWriter("spot", tmp_path, queue.Queue(), compression_level=9, on_segment_written=written.append)
    n = ROW_GROUP_ROWS
    first, second = two_row_groups(n)
    w.add("diff_orderbooks", first)
    day = tmp_path / "spot" / "diff_orderbooks" / "2026-11-25"
    (tmp,) = day.glob("*.tmp")
    os.truncate(tmp, 100)
    w.add("diff_orderbooks", second)
    w.end_segment("1-000001")
    assert "dropping unwritten rows market=spot segment=1-000001 rows={'diff_orderbooks': %d}" % (2 * n) in caplog.text
    assert "CRITICAL" in caplog.text
    assert written == [] and not w._ready and w.stats.lost_rows == 2 * n
    assert not list(day.iterdir())  # nothing corrupt published, the temporary file removed
    w.add("diff_orderbooks", depth_table([("A", MIDNIGHT + 5, 7)]))
    w.end_segment("1-000002")
    assert written == ["1-000002"]
    assert pq.read_table(day / "part-1-000002.parquet").column("final_update_id").to_pylist() == [7]


def test_partial_parts_hold_levels_in_dictionary_pages_and_day_files_do_not(tmp_path):
    """Part files of partial depth use dictionary pages for the level values (cheaper to
    compress); what users read is the same list<double> columns, and the compacted day
    file goes back to plain pages."""
    q: queue.Queue = queue.Queue()
    w = PartWriter("spot", tmp_path, q, compression_level=9)
    t = depth_table([("A", MIDNIGHT + 1000 * k, k) for k in range(500)]).cast(SCHEMAS["partial_orderbooks"])
    w.add("partial_orderbooks", t)
    w.end_segment("1-000001")
    day = tmp_path / "spot" / "partial_orderbooks" / "2026-11-25"
    part = pq.ParquetFile(day / "part-1-000001.parquet")
    names = part.schema_arrow.names
    chunk = part.metadata.row_group(0).column(names.index("bid_prices"))
    assert chunk.dictionary_page_offset is not None
    assert part.schema_arrow == SCHEMAS["partial_orderbooks"]
    assert part.read().equals(t)
    compact_day(tmp_path / "spot" / "partial_orderbooks", "2026-11-25", "partial_orderbooks", 9)
    daily = pq.ParquetFile(tmp_path / "spot" / "partial_orderbooks" / "2026-11-25.parquet")
    assert daily.metadata.row_group(0).column(names.index("bid_prices")).dictionary_page_offset is None
    assert daily.read().select(names).sort_by("received_time").equals(t)


def depth20_parts(root, day: str, n_parts: int, rows_per_part: int, symbols: list[str]) -> int:
    """Part files of partial depth as the writers make them (dictionary pages for the
    levels, delta-encoded ids), with prices that repeat as a real book's do."""
    rng = random.Random(5)
    q: queue.Queue = queue.Queue()
    w = PartWriter("spot", root, q, compression_level=3)
    t, uid = day_start_us(day) + 1000, 0
    for i in range(n_parts):
        rows = []
        for _ in range(rows_per_part):
            t += rng.randrange(1, 1000)
            uid += 1
            mid = 100 + rng.randrange(50)
            rows.append({"received_time": t, "event_time": None, "symbol": rng.choice(symbols),
                         "first_update_id": None, "final_update_id": uid, "prev_final_update_id": None,
                         "transaction_time": None,
                         "bid_prices": [mid - k * 0.01 for k in range(20)],
                         "bid_sizes": [rng.randrange(9) + 0.5 for _ in range(20)],
                         "ask_prices": [mid + k * 0.01 for k in range(20)],
                         "ask_sizes": [rng.randrange(9) + 0.5 for _ in range(20)]})
        w.add("partial_orderbooks", pa.Table.from_pylist(rows, schema=SCHEMAS["partial_orderbooks"]))
        w.end_segment(f"{i + 1}-{i:06d}")
    return uid


def test_arrow_bytes_counts_what_the_rows_take_as_arrow(tmp_path):
    """Compaction's budget is in Arrow bytes; the encoded size of a part file of partial
    depth is a fraction of it, and counting that overran the budget threefold."""
    depth20_parts(tmp_path, "2026-11-24", 2, 3000, [f"S{i:02d}USDT" for i in range(12)])
    for path in (tmp_path / "spot" / "partial_orderbooks" / "2026-11-24").glob("part-*.parquet"):
        f = pq.ParquetFile(path)
        actual = f.read().nbytes
        encoded = sum(f.metadata.row_group(i).total_byte_size for i in range(f.metadata.num_row_groups))
        assert encoded < 0.6 * actual  # why the encoded size cannot be the measure
        assert actual <= arrow_bytes(f) <= 1.3 * actual


def test_compaction_stays_within_its_memory_budget(tmp_path):
    """Arrow's peak allocation while compacting, in a process of its own, against the
    budget, with one symbol's day alone bigger than the budget."""
    kind_dir = tmp_path / "spot" / "partial_orderbooks"
    symbols = ["BIGUSDT"] * 24 + [f"S{i:02d}USDT" for i in range(12)]
    rows = depth20_parts(tmp_path, "2026-11-24", 8, 6000, symbols)
    # the day is ~34 MiB as Arrow (11 MiB encoded), BIGUSDT's rows ~23 MiB: runs of 20 MiB
    budget = 40 << 20
    probe = ("import sys, pyarrow as pa; from pathlib import Path; from storage.compact import compact_day; "
             f"compact_day(Path(sys.argv[1]), '2026-11-24', 'partial_orderbooks', 3, memory_budget={budget}); "
             "print(pa.default_memory_pool().max_memory())")
    out = subprocess.run([sys.executable, "-c", probe, str(kind_dir)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) <= budget
    day_file = kind_dir / "2026-11-24.parquet"
    table = pq.read_table(day_file, columns=["symbol", "final_update_id"])
    assert sorted(table.column("final_update_id").to_pylist()) == list(range(1, rows + 1))
    keys = pq.read_table(day_file, columns=["symbol", "received_time"])
    assert keys.equals(keys.sort_by([("symbol", "ascending"), ("received_time", "ascending")]))
    assert assert_sorted_runs(day_file, "partial_orderbooks") > 1


@pytest.mark.parametrize("phase", ["start", "runs", "merge"])
def test_compaction_stops_before_taking_the_recorders_last_disk_space(tmp_path, monkeypatch, phase):
    """Under DISK_RESERVE free, compaction stops with an error naming the free space; the
    parts stay as they were, the scratch files and the temporary day file go."""
    kind_dir = tmp_path / "spot" / "diff_orderbooks"
    make_parts(kind_dir, "2026-11-24", 7, 300, [f"S{i:02d}USDT" for i in range(12)])
    before = {p.name: p.read_bytes() for p in (kind_dir / "2026-11-24").iterdir()}
    seen: list[str] = []
    merging_now: list[bool] = []
    check, merge = compact._check_space, compact._merge

    def merging(*args):
        merging_now.append(True)
        merge(*args)

    def filling_up(folder):
        now = "start" if not seen else "merge" if merging_now else "runs"
        seen.append(now)
        if now == phase and seen.count(now) == (2 if phase == "runs" else 1):  # the disk is full from here
            monkeypatch.setattr(compact, "DISK_RESERVE", shutil.disk_usage(folder).free + (1 << 40))
        check(folder)

    monkeypatch.setattr(compact, "_check_space", filling_up)
    monkeypatch.setattr(compact, "_merge", merging)
    with pytest.raises(OSError, match=r"compaction stopped: \d+ MiB free on the disk of .* kept for recording"):
        compact_day(kind_dir, "2026-11-24", "diff_orderbooks", 9, memory_budget=60_000)
    assert seen[-1] == phase
    assert {p.name: p.read_bytes() for p in (kind_dir / "2026-11-24").iterdir()} == before
    assert not (kind_dir / "2026-11-24.parquet").exists()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*.compact"))


def test_one_compaction_at_a_time_per_folder(tmp_path, caplog):
    """`collector.py compact` by hand while the service's child works on the same folder:
    the second leaves the day to the first (a warning), nothing is written twice."""
    kind_dir = tmp_path / "spot" / "diff_orderbooks"
    make_parts(kind_dir, "2026-11-24", 2, 10, ["A"])
    now = day_start_us("2026-11-25") + 60_000_000
    with open(kind_dir / ".compact.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(compact.Busy, match="being compacted by another process"):
            compact_day(kind_dir, "2026-11-24", "diff_orderbooks", 9)
        assert compact_all(tmp_path, 9, now) == 0
        assert "is being compacted by another process; 2026-11-24 left to it" in caplog.text
        assert len(list((kind_dir / "2026-11-24").glob("part-*.parquet"))) == 2
    assert compact_all(tmp_path, 9, now) == 1  # once the other is done
    assert pq.read_table(kind_dir / "2026-11-24.parquet").num_rows == 20
