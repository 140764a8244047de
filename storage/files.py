"""Atomic Parquet files and the output tree (docs/data.md).

    data_dir/<market>/<kind>/YYYY-MM-DD.parquet          a finished (compacted) day
    data_dir/<market>/<kind>/YYYY-MM-DD/part-*.parquet   the current day, in parts

A file appears under its final name only once it is complete: it is written to a
hidden temporary name (`.name.tmp`, which no `*.parquet` glob matches), fsynced,
renamed, and the folder is fsynced.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

US_PER_DAY = 86_400_000_000


def day_of(us: int) -> str:
    """UTC day of a microsecond timestamp, as YYYY-MM-DD."""
    return dt.datetime.fromtimestamp(us / 1e6, tz=dt.timezone.utc).strftime("%Y-%m-%d")


def day_start_us(day: str) -> int:
    d = dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
    return int(d.timestamp()) * 1_000_000


def parquet_options(compression_level: int, schema: pa.Schema) -> dict:
    """Writer settings shared by part files and day files, chosen by measurement
    (bench/stages.py and BENCHMARKS.md): ZSTD; a dictionary for the repeated strings;
    delta encoding for the int64 stamps and ids, which grow by small steps row after
    row (a third fewer bytes for diffs); plain doubles for the levels (byte-stream-split
    measured no smaller there)."""
    dictionary = [f.name for f in schema if f.name in ("symbol", "reason")]
    delta = {f.name: "DELTA_BINARY_PACKED" for f in schema if f.type == pa.int64()}
    return dict(
        compression="zstd",
        compression_level=compression_level,
        use_dictionary=dictionary,
        column_encoding=delta,
        write_statistics=True,
        # a CRC per page: corruption on disk (bit rot, a bad copy) is detected on read,
        # e.g. before an upload (pq.ParquetFile(..., page_checksum_verification=True))
        write_page_checksum=True,
    )


def part_options(compression_level: int, schema: pa.Schema, kind: str) -> dict:
    """`parquet_options` for the day's part files. A partial-depth row repeats most of the
    previous row of its symbol (20 levels, most of them unchanged), but a thousand rows
    of other symbols lie between the two, and ZSTD-9 spent most of the writers' time
    finding those matches: 10 µs a row. Dictionary pages for its level values cut that by
    a third, for files a few per cent larger (and still fast when the values are all
    different: the writer falls back to plain pages; bench/encodings.py, BENCHMARKS.md).
    Day files keep `parquet_options`: sorted by symbol, they are much smaller without it."""
    options = parquet_options(compression_level, schema)
    if kind == "partial_orderbooks":
        levels = [f"{f.name}.list.element" for f in schema if pa.types.is_list(f.type)]
        options["use_dictionary"] = options["use_dictionary"] + levels
    return options


def part_file(segment: str) -> str:
    """A part file's name: it carries the journal segment whose rows it holds (`storage.journal`)."""
    return f"part-{segment}.parquet"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


def publish(tmp: Path, final: Path) -> None:
    """fsync tmp, rename it to final, fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _write_atomic(final: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` makes the file under a temporary name; then it is published (or removed)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        write(tmp)
        publish(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_table_atomic(final: Path, table: pa.Table, compression_level: int,
                       metadata: dict[bytes, bytes] | None = None) -> None:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    _write_atomic(final, lambda tmp: pq.write_table(table, tmp, **parquet_options(compression_level, table.schema)))


def clean_temp_files(root: Path) -> list[Path]:
    """Remove temporaries that a crash left behind; they were never published."""
    removed = []
    if root.exists():
        for p in root.rglob(".*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
