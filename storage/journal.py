"""Write-ahead journal: the raw frames and snapshot bodies a processor took in, on disk
within `sync_every` seconds, so that a SIGKILL loses nothing received more than a
second before it (crash safety).

Why a journal rather than tiny part files: a part file per second per kind would be
~700,000 files a day; the journal is one zstd stream per flush period, appended by the
processor thread (which already has the bytes in hand), and deleted as soon as the part
files built from it are published.

    data_dir/.journal/<market>/seg-<segment>.zst     segment = <run start µs>-<counter>
    data_dir/<market>/<kind>/<day>/part-<segment>.parquet

A segment holds exactly the frames whose rows go into the part files of the same name.
On start-up, every segment still present is replayed; a kind whose part file of that
segment already exists is skipped, so nothing is written twice.

Record: `<B q q I` (type, received_us, conn_id or request_us, length) + payload. A WS
record is one frame; a WS_MANY record is the frames of one socket read (one stamp), its
payload `<I` count, `<I` length of each, then the frames; a REST payload is
`SYMBOL LIMIT ` + body.
"""
from __future__ import annotations

import logging
import os
import struct
import sys
import time
from array import array
from pathlib import Path
from typing import BinaryIO

import zstandard

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<BqqI")
_SWAP = sys.byteorder == "big"  # records are little-endian
assert array("I").itemsize == 4
_WS, _REST, _WS_MANY = 0, 1, 2  # record types on disk
# what read_segment gives back: ("ws", received_us, conn_id, [frame, ...]) and
# ("rest", received_us, (symbol, limit, request_us, body))
WS_RECORD, REST_RECORD = "ws", "rest"


def journal_dir(data_dir: Path, market: str) -> Path:
    return data_dir / ".journal" / market


class Journal:
    """Owned by one processor thread; not thread-safe by design."""

    def __init__(self, folder: Path, run_id: int, sync_every: float = 0.2, level: int = 1):
        self.folder, self.run_id, self.sync_every = folder, run_id, sync_every
        self.cctx = zstandard.ZstdCompressor(level=level)
        self.counter = 0
        self.segment = ""
        self._file: BinaryIO | None = None
        self._writer: zstandard.ZstdCompressionWriter | None = None
        self._pending: list[bytes] = []
        self._last_sync = time.monotonic()
        self.failed = False
        self.errors = 0
        self.open_next()

    def open_next(self) -> str:
        """Start a new segment; returns its name."""
        self.counter += 1
        self.segment = f"{self.run_id}-{self.counter:06d}"
        self._written = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.folder / f"seg-{self.segment}.zst", "wb")
            self._writer = self.cctx.stream_writer(self._file, closefd=False)
            self.failed = False
        except OSError as e:
            self._fail(e)
        return self.segment

    def _fail(self, e: OSError) -> None:
        self.errors += 1
        if not self.failed:
            log.error("journal write failed folder=%s error=%s: rows stay in memory but are not "
                      "crash-safe until it works again", self.folder, e)
        self.failed = True
        self._writer = None

    def add_ws(self, received_us: int, conn: int, frames: list[bytes]) -> None:
        """The frames of one socket read."""
        pending = self._pending
        if len(frames) == 1:
            raw = frames[0]
            pending.append(_HEAD.pack(_WS, received_us, conn, len(raw)))
            pending.append(raw)
            return
        lengths = array("I", map(len, frames))  # half the cost of struct.pack(f"<{n}I", ...)
        if _SWAP:
            lengths.byteswap()
        pending.append(_HEAD.pack(_WS_MANY, received_us, conn, 4 + 4 * len(frames) + sum(map(len, frames))))
        pending.append(len(frames).to_bytes(4, "little") + lengths.tobytes())
        pending.extend(frames)

    def add_rest(self, received_us: int, symbol: str, limit: int, request_us: int, raw: bytes) -> None:
        payload = f"{symbol} {limit} ".encode() + raw
        self._pending.append(_HEAD.pack(_REST, received_us, request_us, len(payload)))
        self._pending.append(payload)

    def sync(self, force: bool = False) -> None:
        """Push what was added to the kernel (survives SIGKILL), at most every sync_every s."""
        now = time.monotonic()
        if not force and now - self._last_sync < self.sync_every:
            return
        self._last_sync = now
        pending, self._pending = self._pending, []
        if self._writer is None or not pending:
            return
        self._written += len(pending)
        try:
            self._writer.write(b"".join(pending))
            self._writer.flush(zstandard.FLUSH_BLOCK)
        except OSError as e:
            self._fail(e)

    def close_segment(self) -> str:
        """End the current segment (fsync) and open the next; returns the ended one."""
        self.sync(force=True)
        ended = self.segment
        if self._writer is not None:
            try:
                self._writer.flush(zstandard.FLUSH_FRAME)
                if self._file is not None:
                    os.fsync(self._file.fileno())
            except OSError as e:
                self._fail(e)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self.open_next()
        return ended

    def close(self) -> None:
        """At a clean stop, after the last close_segment(): the open segment is empty
        and is removed; one with records in it (not expected) is kept for recovery."""
        empty = not self._pending and self._written == 0
        self.sync(force=True)
        if self._file is not None:
            try:
                if self._writer is not None:
                    self._writer.flush(zstandard.FLUSH_FRAME)
                self._file.close()
            except OSError:
                pass
        if empty:
            self.delete(self.segment)

    def delete(self, segment: str) -> None:
        try:
            (self.folder / f"seg-{segment}.zst").unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot delete journal segment %s: %s", segment, e)


def segments(folder: Path) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        return []
    found = [(p.name[4:-4], p) for p in folder.glob("seg-*.zst")]
    return sorted(found, key=lambda x: tuple(int(n) for n in x[0].split("-")))


def read_segment(path: Path) -> tuple[list[tuple], bool]:
    """Records of a segment, (WS_RECORD, received_us, conn_id, frames) or (REST_RECORD,
    received_us, (symbol, limit, request_us, body)), in the order added; (records, complete).

    A segment cut short by a crash yields everything up to the last complete block."""
    data = bytearray()
    complete = True
    with open(path, "rb") as f:
        raw = f.read()
    # frame by frame: a stream reader ends silently at a frame cut short, which must be
    # told apart (the crash cut it) from a segment closed cleanly
    while raw:
        d = zstandard.ZstdDecompressor().decompressobj()
        try:
            data += d.decompress(raw)
        except zstandard.ZstdError:
            complete = False
            break
        if not d.eof:
            complete = False  # its last block was being written
            break
        raw = d.unused_data
    items: list[tuple] = []
    pos = 0
    while pos + _HEAD.size <= len(data):
        kind, received, extra, length = _HEAD.unpack_from(data, pos)
        start, pos = pos + _HEAD.size, pos + _HEAD.size + length
        if pos > len(data):
            complete = False
            break
        payload = bytes(data[start:pos])
        if kind == _WS:
            items.append((WS_RECORD, received, extra, [payload]))
        elif kind == _WS_MANY:
            n = int.from_bytes(payload[:4], "little") if length >= 4 else -1
            lengths = struct.unpack_from(f"<{n}I", payload, 4) if 0 < n <= (length - 4) // 4 else ()
            if not lengths or 4 + 4 * n + sum(lengths) != length:
                complete = False  # not written by this code: keep what came before it
                break
            frames, at = [], 4 + 4 * n
            for k in lengths:
                frames.append(payload[at:at + k])
                at += k
            items.append((WS_RECORD, received, extra, frames))
        else:
            symbol, limit, body = payload.split(b" ", 2)
            items.append((REST_RECORD, received, (symbol.decode(), int(limit), extra, body)))
    if pos < len(data):
        complete = False  # a record's head cut short
    return items, complete
