"""What only the processor sees of a day's delivery, per symbol, for the quality record
(storage/quality.py): kept diffs that another connection delivered too (so the ones that
came from a single copy are the rest), and losses of connections carrying the symbol.

Counts go to the writer as the `quality` kind's part files with every other build
(`DELIVERY` rows, one per day and symbol a build); compaction folds them into the day's
record. A diff delivered by three copies is counted once: the ids counted lately are kept
per symbol (as many as the duplicate memory holds). Counts of a segment lost in a crash are
lost with it (the journal replays frames, less their copies)."""
from __future__ import annotations

from collections import deque

import pyarrow as pa

from storage.files import US_PER_DAY, day_of
from storage.schemas import DELIVERY

RECENT = 4096  # ids remembered per symbol: more than the continuity check's duplicate memory


class DeliveryCounts:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], list[int]] = {}  # (day, symbol) -> [last µs, duplicated, lost]
        self.counted: dict[str, tuple[set[int], deque[int]]] = {}
        self._day, self._day_from, self._day_to = "", 0, 0  # the day of the last count, and its bounds

    def _row(self, at_us: int, symbol: str) -> list[int]:
        if not self._day_from <= at_us < self._day_to:
            self._day = day_of(at_us)
            self._day_from = at_us - at_us % US_PER_DAY
            self._day_to = self._day_from + US_PER_DAY
        row = self.rows.setdefault((self._day, symbol), [at_us, 0, 0])
        row[0] = max(row[0], at_us)
        return row

    def duplicated(self, at_us: int, symbol: str, u: int) -> None:
        """A copy of the kept diff ending at `u` arrived (from another connection)."""
        ids, order = self.counted.setdefault(symbol, (set(), deque()))
        if u in ids:
            return  # a third copy
        ids.add(u)
        order.append(u)
        if len(order) > RECENT:
            ids.discard(order.popleft())
        self._row(at_us, symbol)[1] += 1

    def lost(self, at_us: int, symbols: set[str]) -> None:
        """A connection carrying `symbols` ended unexpectedly."""
        for symbol in symbols:
            self._row(at_us, symbol)[2] += 1

    def __len__(self) -> int:
        return len(self.rows)

    def take(self) -> pa.Table:
        rows, self.rows = self.rows, {}
        return pa.Table.from_pylist([{"time": t, "symbol": symbol, "diffs_duplicated": dup, "connections_lost": lost}
                                     for (_, symbol), (t, dup, lost) in sorted(rows.items())], schema=DELIVERY)
