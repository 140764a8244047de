"""A market's inbox: what its readers and snapshot workers hand to its processor.

`queue.Queue` costs about 1 µs a put and 1 µs a get in Python-level locks and condition
variables, paid once per WebSocket frame on both sides: at 40,000 frames a second that
was a tenth of the time the threads hold the GIL. `queue.SimpleQueue` is implemented in
C (0.1 µs each); this adds the bound the collector needs on top of it:

- `put_nowait` raises `queue.Full` at `maxsize` items, as `queue.Queue` does;
- `put` waits while the inbox is full (the reader stops reading: TCP back-pressure,
  nothing dropped), looking again every `FULL_WAIT` seconds. Only a processor that is far
  behind makes anyone wait, so a poll costs nothing on the normal path, and the getter
  never has to wake anyone.

Several putters may pass the bound check at once, so the inbox can hold a few items more
than `maxsize` (at most one per putter thread).
"""
from __future__ import annotations

import queue
import time

FULL_WAIT = 0.005


class Inbox:
    def __init__(self, maxsize: int = 0):
        self.maxsize = maxsize if maxsize > 0 else 1 << 62
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.qsize = self._q.qsize
        self.empty = self._q.empty
        self.get = self._q.get
        self.get_nowait = self._q.get_nowait

    def put_nowait(self, item) -> None:
        if self._q.qsize() >= self.maxsize:
            raise queue.Full
        self._q.put(item)

    def put(self, item) -> None:
        """Wait while full, then add `item` (never dropped)."""
        while self._q.qsize() >= self.maxsize:
            time.sleep(FULL_WAIT)
        self._q.put(item)
