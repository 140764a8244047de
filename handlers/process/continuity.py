"""Per-symbol continuity of a diff stream, and duplicate detection: the same diff is
written once, and every break is named.

Pure state, no I/O, so that it can be tested exhaustively. One instance per market,
owned by that market's processor thread. The rule of when a diff continues the one
before it is the market's (`Market.continues` in markets.py).
"""
from __future__ import annotations

from array import array
from collections import deque

import numpy as np

from markets import Market

OK, START, DUPLICATE, STALE, SEQUENCE, RECONNECT = (
    "ok", "start", "duplicate", "stale", "sequence", "reconnect")
# Why a symbol's record ends (the `reason` of its last `gaps` row, next_first_update_id
# null): it stopped trading (HALT, BREAK, ...), left exchangeInfo, or left the top N at
# the daily ranking. Its record starts again, if ever, with a `start` row.
HALTED, DELISTED, UNRANKED = "halted", "delisted", "unranked"


class _Recent:
    """A symbol's diff stream: its head (last u) and connection, and its last `size` final
    update ids, for duplicate detection.

    A ring of int64 (8 bytes an id) rather than a deque and a set of Python ints (about
    100 bytes an id: 2048 ids were ~220 KB a symbol, ~440 MB for 2,000 symbols). `add`
    is on the hot path; the lookup runs only for an event at or behind the stream head
    (duplicates, stale events), in C over the ring.

    How many ids (`Continuity.memory`, 512): a duplicate comes from a second connection
    delivering the same events while two overlap (rotation, serverShutdown: seconds,
    until the new one has delivered), so it trails its first copy by at most the lag
    between the two connections. 512 ids are 51 s of a 100 ms stream. An id older than
    that is recorded as stale, never dropped: a memory too short could write a duplicate
    twice, never lose an event. 2,048 ids took 33 MB at 2,000 symbols, a tenth of the
    peak RSS there (BENCHMARKS.md, The recording path).
    """

    __slots__ = ("ring", "view", "n", "head", "conn", "head_us")

    def __init__(self, size: int):
        self.ring = array("q", bytes(8 * size))
        self.view = np.frombuffer(self.ring, np.int64)
        self.n = 0  # ids ever added; the next goes to ring[n % size]
        self.head: int = 0          # the stream head (last u), kept here by Continuity
        self.conn: int | None = None  # ... the connection it came on
        self.head_us = 0              # ... and when it was received

    def add(self, u: int) -> None:
        n = self.n
        self.ring[n % len(self.ring)] = u
        self.n = n + 1

    def __contains__(self, u: int) -> bool:
        # The newest ids first, in Python: a redundant connection's copy trails its first
        # copy by a few events, and numpy's call costs more than these compares.
        ring, n = self.ring, self.n
        size = len(ring)
        for i in range(n - 1, max(n - 9, -1), -1):
            if ring[i % size] == u:
                return True
        return n > 8 and bool((self.view[:n] == u).any())


def memory_for(diff_speed: str) -> int:
    """Ids remembered a symbol (`_Recent`): 512 are 51 s of a 100 ms stream; an every-event
    stream (`0ms`, up to ~1,000 events a second on the busiest futures) gets 8 times as
    many, so that a copy trailing its first by a few seconds is still known (32 KB a
    symbol)."""
    return 4096 if diff_speed == "0ms" else 512


class Continuity:
    def __init__(self, market: Market, memory: int = 512):
        self.continues = market.continues
        self.memory = memory
        self.streams: dict[str, _Recent] = {}  # symbol -> its head, connection and recent ids
        self.since: dict[int, int] = {}  # connection -> when its first read was received (µs)

    def saw(self, conn: int, received_us: int) -> None:
        """A read of connection `conn` (called for every read, before its events)."""
        if conn not in self.since:
            self.since[conn] = received_us

    def check(self, symbol: str, U: int, u: int, pu: int | None, conn: int,
              received_us: int = 0) -> tuple[str, int | None]:
        """Classify one diff event; returns (status, previous u).

        ok/start/sequence/reconnect: write the row (and a gap row for the last three);
        duplicate: already written, skip it; stale: older than the stream head and not
        seen before: written (never dropped), but the head does not move back.

        A break is `reconnect` when the event after it came on a connection that was not
        yet there when the event before it was received (a connection replaced); with
        several connections reading the stream at once, a break on a connection that was
        there all along is `sequence`, whichever connection happened to come first.
        """
        st = self.streams.get(symbol)
        if st is None:
            self._start(symbol, u, conn, received_us)
            return START, None
        last_u = st.head
        if u <= last_u:
            if u in st:
                return DUPLICATE, last_u
            st.add(u)
            return STALE, last_u
        n, ring = st.n, st.ring  # st.add(u), inline: this runs for every diff
        ring[n % len(ring)] = u
        st.n = n + 1
        st.head = u
        last_conn, st.conn = st.conn, conn
        last_us, st.head_us = st.head_us, received_us
        if self.continues(U, pu, last_u):
            return OK, last_u
        if last_conn is None or conn == last_conn:
            return SEQUENCE, last_u
        born = self.since.get(conn)
        return (RECONNECT if born is None or born > last_us else SEQUENCE), last_u

    def head(self, symbol: str) -> int | None:
        """The stream head (last u) of `symbol`, None before its first event."""
        st = self.streams.get(symbol)
        return None if st is None else st.head

    def seed(self, symbol: str, u: int) -> None:
        """Continue from a stream head known from disk (journal recovery); connection unknown."""
        self._start(symbol, u, None)

    def _start(self, symbol: str, u: int, conn: int | None, received_us: int = 0) -> None:
        st = self.streams[symbol] = _Recent(self.memory)
        st.head, st.conn, st.head_us = u, conn, received_us
        st.add(u)


class PartialDedup:
    """Partial-depth frames are repeated by every open connection of a symbol while two
    overlap (rotation). A frame whose update id was already seen from *another*
    connection is the same frame twice; the same id again on the same connection is a
    new frame of an unchanged book (spot sends those) and is kept.

    Per symbol: the last `memory` ids seen (id -> connection) and their order of arrival,
    so that the oldest is forgotten in O(1) (`next(iter(dict))` after many deletions
    walks the dict's deleted slots: measured 0.42 against 0.24 µs a frame)."""

    def __init__(self, memory: int = 64):
        self.memory = memory
        self.seen: dict[str, tuple[dict[int, int], deque]] = {}

    def is_duplicate(self, symbol: str, u: int, conn: int) -> bool:
        entry = self.seen.get(symbol)
        if entry is None:
            entry = self.seen[symbol] = ({}, deque())
        ids, order = entry
        first = ids.get(u)
        if first is not None:
            return first != conn
        ids[u] = conn
        order.append(u)
        if len(order) > self.memory:
            del ids[order.popleft()]
        return False


class Hole:
    """A break seen across connections, not yet confirmed as a gap."""

    __slots__ = ("detected_us", "last_u", "start", "end_U", "end_pu", "deadline", "reason")

    def __init__(self, detected_us: int, last_u: int, U: int, pu: int | None, deadline: float,
                 reason: str = RECONNECT):
        self.detected_us, self.last_u, self.start = detected_us, last_u, last_u
        self.end_U, self.end_pu, self.deadline, self.reason = U, pu, deadline, reason


class PendingHoles:
    """Two connections deliver the same events with their own delays, so while they
    overlap (rotation, serverShutdown, redundant connections) one's event k+1 can be
    processed before the other's event k, and with redundant connections an event one
    connection lost can still come on another. Every break is therefore held for `wait`
    seconds: if the missing events arrive (as stale ones) in that time, it was a
    reordering and no gap is written; otherwise it becomes a gap row with its reason,
    stamped with the time it was first seen. A symbol may have several holes held at
    once (one connection losing events here and there while another lags); past
    `per_symbol` the oldest is confirmed at once, to bound memory."""

    def __init__(self, market: Market, wait: float = 1.0, per_symbol: int = 64):
        self.continues, self.wait, self.per_symbol = market.continues, wait, per_symbol
        self.holes: dict[str, list[Hole]] = {}

    def open(self, symbol: str, detected_us: int, last_u: int, U: int, pu: int | None, now: float,
             reason: str = RECONNECT) -> Hole | None:
        """Hold a new hole; returns a hole of the symbol that must be confirmed now (the
        oldest, past `per_symbol` held), or None."""
        held = self.holes.setdefault(symbol, [])
        held.append(Hole(detected_us, last_u, U, pu, now + self.wait, reason))
        return held.pop(0) if len(held) > self.per_symbol else None

    def fill(self, symbol: str, U: int, u: int, pu: int | None) -> bool:
        """A stale event arrived; True when it closed one of the symbol's holes (no gap after all)."""
        held = self.holes.get(symbol)
        if not held:
            return False
        for i, hole in enumerate(held):
            if self.continues(U, pu, hole.start):
                hole.start = max(hole.start, u)
            if self.continues(hole.end_U, hole.end_pu, hole.start):  # the event after the hole now follows
                del held[i]
                if not held:
                    del self.holes[symbol]
                return True
        return False

    def drop(self, symbol: str) -> list[Hole]:
        """The symbol's held holes, now (its record ends)."""
        return self.holes.pop(symbol, [])

    def due(self, now: float | None = None) -> list[tuple[str, Hole]]:
        """Holes to confirm as gaps: those past their deadline (or all, if now is None)."""
        out = []
        for symbol in list(self.holes):
            held = self.holes[symbol]
            keep = [h for h in held if now is not None and h.deadline > now]
            out += [(symbol, h) for h in held if now is None or h.deadline <= now]
            if keep:
                self.holes[symbol] = keep
            else:
                del self.holes[symbol]
        return out
