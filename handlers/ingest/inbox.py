"""A market's inbox: what its readers and snapshot workers hand to its processor.

`queue.Queue` costs about 1 µs a put and 1 µs a get in Python-level locks and condition
variables. `queue.SimpleQueue` is implemented in C (0.1 µs each); this adds the bound the
collector needs on top of it, counted in frames:

- an item carries `n` frames (a reader hands over every frame of one socket read as one
  item, so the hand-over is paid once a read, not once a frame); `qsize()` is the frames
  waiting, and `maxsize` bounds them;
- `put_nowait` raises `queue.Full` when `maxsize` frames are waiting, as `queue.Queue`
  does;
- `put` waits while the inbox is full (the reader stops reading: TCP back-pressure,
  nothing dropped), looking again every `FULL_WAIT` seconds. Only a processor that is far
  behind makes anyone wait, so a poll costs nothing on the normal path, and the getter
  never has to wake anyone.

Several putters may pass the bound check at once, so the inbox can hold a few items more
than `maxsize` allows (at most one per putter thread).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

FULL_WAIT = 0.005
# An item: (WS, received_us, conn_id, [frame, ...]), the frames of one socket read, from a
# reader; (REST, received_us, (symbol, limit, request_us, body)), a snapshot answer; or
# (SYMBOLS, received_us, (added symbols, ((symbol, reason), ...) removed)), the market's
# symbol set changing while running; (CLOCK, sample_us, row), a `clock` sample (a dict of
# the clock schema's columns); (LOST, lost_us, (conn_id, stream names)), a connection
# that ended unexpectedly (counted in the quality record); or storage.writer.STOP, the end.
WS, REST, SYMBOLS, CLOCK, LOST = 0, 1, 2, 3, 4
Item = Any  # (tag, ...): WS or REST first, the rest as its producer documents; or the writer's STOP


class Inbox:
    def __init__(self, maxsize: int = 0):
        self.maxsize = maxsize if maxsize > 0 else 1 << 62
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards `frames`: readers add, the processor takes away
        self.frames = 0
        self.empty = self._q.empty

    def qsize(self) -> int:
        """Frames waiting."""
        return self.frames

    def put_nowait(self, item: Item, n: int = 1) -> None:
        if self.frames >= self.maxsize:
            raise queue.Full
        self._add(item, n)

    def put(self, item: Item, n: int = 1) -> None:
        """Wait while full, then add `item` of `n` frames (never dropped)."""
        while self.frames >= self.maxsize:
            time.sleep(FULL_WAIT)
        self._add(item, n)

    def _add(self, item: Item, n: int) -> None:
        with self._lock:
            self.frames += n
        self._q.put((n, item))

    def get_nowait(self) -> Item:
        n, item = self._q.get_nowait()
        with self._lock:
            self.frames -= n
        return item

    def get(self, block: bool = True, timeout: float | None = None) -> Item:
        n, item = self._q.get(block, timeout)
        with self._lock:
            self.frames -= n
        return item
