"""Today's coverage so far, every symbol of a market together, for the status line,
`collector.py status` and `obc_coverage_ratio`: the quality record's rule (storage/quality.py)
as the processor can follow it while it runs. A symbol is recorded from its `start` to
the end of its record; a hole opens when a break is detected and closes when a snapshot
whose `lastUpdateId` reaches past the missing ids arrives. The day's record, made from the
files when the day is compacted, counts from the diffs on either side instead: the running
figure is the same to within the moments between a diff and its detection or snapshot."""
from __future__ import annotations

from storage.files import US_PER_DAY


class RunningCoverage:
    def __init__(self) -> None:
        self.day_to = 0
        self.since: dict[str, int] = {}  # symbol -> µs its record started (today's 00:00 at most)
        self.done_us = 0  # recorded time of the records that ended today
        self.holes: dict[str, tuple[int, int]] = {}  # symbol -> (µs the hole opened, the id a snapshot must reach)
        self.uncovered_us = 0  # closed holes today

    def _roll(self, now_us: int) -> None:
        """A new day starts its count at 00:00, with what is open carried over."""
        if now_us < self.day_to:
            return
        start = now_us - now_us % US_PER_DAY
        self.since = {s: max(t, start) for s, t in self.since.items()}
        self.holes = {s: (max(t, start), need) for s, (t, need) in self.holes.items()}
        self.done_us = self.uncovered_us = 0
        self.day_to = start + US_PER_DAY

    def started(self, symbol: str, at_us: int) -> None:
        self._roll(at_us)
        self.since.setdefault(symbol, at_us)

    def broke(self, symbol: str, at_us: int, needed_id: int) -> None:
        self._roll(at_us)
        if symbol in self.since and symbol not in self.holes:
            self.holes[symbol] = (at_us, needed_id)

    def snapshot(self, symbol: str, at_us: int, last_update_id: int) -> None:
        hole = self.holes.get(symbol)
        if hole is not None and last_update_id >= hole[1]:
            self._roll(at_us)
            del self.holes[symbol]
            self.uncovered_us += max(0, at_us - max(hole[0], self.day_to - US_PER_DAY))

    def ended(self, symbol: str, at_us: int) -> None:
        self._roll(at_us)
        since = self.since.pop(symbol, None)
        if since is not None:
            self.done_us += at_us - since
        hole = self.holes.pop(symbol, None)
        if hole is not None:
            self.uncovered_us += at_us - hole[0]

    def ratio(self, now_us: int) -> float | None:
        """Covered over recorded time today, up to `now_us` (None before any record).
        Read from another thread: it only reads, over copies."""
        day_from = self.day_to - US_PER_DAY
        if now_us >= self.day_to:
            return None  # the processor has not seen the new day yet: nothing to say of it
        recorded = self.done_us + sum(now_us - max(t, day_from) for t in list(self.since.values()))
        if recorded <= 0:
            return None
        open_us = sum(now_us - max(t, day_from) for t, _ in list(self.holes.values()))
        return max(0.0, 1.0 - (self.uncovered_us + open_us) / recorded)
