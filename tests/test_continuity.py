"""Continuity and duplicates, as properties over random event streams."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from handlers.process.continuity import DUPLICATE, OK, RECONNECT, SEQUENCE, STALE, START, Continuity, PartialDedup
from markets import FUTURES, SPOT


def spot_events(spans):
    """Consecutive spot events: U = previous u + 1."""
    events, u = [], 1000
    for n in spans:
        events.append((u + 1, u + n, None))
        u += n
    return events


def futures_events(spans, skips):
    """Futures events: ids skip, pu = previous u."""
    events, u = [], 10**9
    for n, skip in zip(spans, skips, strict=False):
        U = u + skip
        events.append((U, U + n, u))
        u = U + n
    return events


@given(st.lists(st.integers(1, 50), min_size=2, max_size=60), st.data())
def test_spot_drops_are_gaps_and_repeats_are_duplicates(spans, data):
    events = spot_events(spans)
    dropped = data.draw(st.sets(st.integers(1, len(events) - 1)))
    repeated = data.draw(st.sets(st.integers(0, len(events) - 1)))
    c = Continuity(SPOT)
    statuses = []
    for i, (U, u, pu) in enumerate(events):
        if i in dropped:
            continue
        statuses.append((i, c.check("X", U, u, pu, conn=1)[0]))
        if i in repeated:
            statuses.append((i, c.check("X", U, u, pu, conn=2)[0]))
    seen = set()
    prev_kept = None
    for i, status in statuses:
        if i in seen:
            assert status == DUPLICATE
            continue
        seen.add(i)
        if prev_kept is None:
            assert status == START
        elif any(j in dropped for j in range(prev_kept + 1, i)):
            assert status == SEQUENCE
        else:
            assert status == OK
        prev_kept = i


@given(st.lists(st.integers(0, 30), min_size=2, max_size=60), st.lists(st.integers(1, 40), min_size=60, max_size=60),
       st.data())
def test_futures_uses_pu_never_U(spans, skips, data):
    events = futures_events(spans, skips)
    dropped = data.draw(st.sets(st.integers(1, len(events) - 1)))
    c = Continuity(FUTURES)
    prev = None
    for i, (U, u, pu) in enumerate(events):
        if i in dropped:
            continue
        status, _ = c.check("X", U, u, pu, conn=1)
        expected = START if prev is None else (SEQUENCE if any(j in dropped for j in range(prev + 1, i)) else OK)
        assert status == expected, (i, status, expected)
        prev = i


def test_reconnect_is_named_and_stale_is_kept():
    c = Continuity(SPOT)
    assert c.check("X", 1, 5, None, conn=1)[0] == START
    assert c.check("X", 6, 9, None, conn=1)[0] == OK
    assert c.check("X", 20, 25, None, conn=2) == (RECONNECT, 9)
    assert c.check("X", 26, 30, None, conn=2)[0] == OK
    assert c.check("X", 10, 12, None, conn=2) == (STALE, 30)  # never seen: recorded, head stays
    assert c.check("X", 10, 12, None, conn=2) == (DUPLICATE, 30)
    assert c.check("X", 31, 31, None, conn=2)[0] == OK
    # overlapping window after a reconnect (U <= last u + 1 <= u) loses nothing
    assert c.check("X", 29, 35, None, conn=3)[0] == OK
    assert c.check("Y", 100, 100, None, conn=3)[0] == START


def test_partial_dedup_across_connections_only():
    d = PartialDedup()
    assert not d.is_duplicate("X", 5, conn=1)
    assert not d.is_duplicate("X", 5, conn=1)   # unchanged book, same connection: a new frame
    assert d.is_duplicate("X", 5, conn=2)       # the same frame from the overlapping connection
    assert not d.is_duplicate("X", 6, conn=2)
    assert d.is_duplicate("X", 6, conn=1)


def test_reordering_across_connections_is_not_a_gap():
    from handlers.process.continuity import PendingHoles
    spot = PendingHoles(SPOT, wait=1.0)
    # head u=10 on the old connection; the new one delivers U=16..20 first
    assert spot.open("X", detected_us=5, last_u=10, U=16, pu=None, now=0.0) is None
    assert not spot.fill("X", 11, 13, None)   # the old connection catches up ...
    assert spot.fill("X", 14, 15, None)       # ... and closes the hole: no gap
    assert spot.due(now=None) == []
    futures = PendingHoles(FUTURES, wait=1.0)
    futures.open("X", detected_us=5, last_u=100, U=130, pu=120, now=0.0)
    assert not futures.fill("X", 101, 110, 100)
    assert futures.fill("X", 115, 120, 110)
    # a hole that is not filled in time is due as a gap, with its first detection time
    futures.open("Y", detected_us=7, last_u=100, U=130, pu=120, now=0.0)
    assert futures.due(now=0.5) == []
    [(symbol, hole)] = futures.due(now=1.0)
    assert (symbol, hole.detected_us, hole.last_u, hole.end_U) == ("Y", 7, 100, 130)


class _ModelRecent:
    """The reference: the last `size` ids added, in a deque and a multiset (an id added
    twice is remembered until its last copy leaves; Continuity never adds an id it
    remembers, but the ring must not depend on that)."""

    def __init__(self, size):
        from collections import Counter, deque
        self.order, self.seen = deque(maxlen=size), Counter()

    def add(self, u):
        if len(self.order) == self.order.maxlen:
            old = self.order[0]
            self.seen[old] -= 1
            if not self.seen[old]:
                del self.seen[old]
        self.order.append(u)
        self.seen[u] += 1


@given(st.lists(st.tuples(st.integers(-2**63, 2**63 - 1) | st.integers(0, 40), st.booleans()), max_size=200),
       st.integers(1, 16))
def test_recent_ring_remembers_exactly_the_last_ids(ops, size):
    from handlers.process.continuity import _Recent
    ring, model = _Recent(size), _ModelRecent(size)
    for u, add in ops:
        assert (u in ring) == (u in model.seen)
        if add:
            ring.add(u)
            model.add(u)


def test_duplicate_memory_is_compact():
    """2,000 symbols each remembering their last 512 ids: the ring holds 8 bytes an id (the
    deque and set it replaced took ~220 KB a symbol for 2,048 ids, ~440 MB for 2,000
    symbols)."""
    import tracemalloc
    tracemalloc.start()
    c = Continuity(SPOT)
    base = tracemalloc.get_traced_memory()[0]
    for s in range(2000):
        c.check(f"S{s}", 1, 1, None, 1)
    for u in range(2, 514):
        for s in range(0, 2000, 100):  # fill 20 symbols' rings completely
            c.check(f"S{s}", u, u, None, 1)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert used < 2000 * 6_000, used
    assert c.check("S0", 513, 513, None, 2)[0] == DUPLICATE
    assert c.check("S0", 2, 2, None, 2)[0] == DUPLICATE  # the oldest id remembered
    assert c.check("S0", 1, 1, None, 2)[0] == STALE  # forgotten: 512 newer ids since; recorded


def test_head_and_seed_for_journal_recovery():
    c = Continuity(FUTURES)
    assert c.head("X") is None
    c.seed("X", 100)  # from the part files on disk: connection unknown
    assert c.head("X") == 100
    assert c.check("X", 101, 110, 100, conn=1) == (OK, 100)
    assert c.head("X") == 110
    assert c.check("X", 101, 110, 100, conn=2)[0] == DUPLICATE


def test_several_holes_of_one_symbol_are_held_and_filled_apart():
    from handlers.process.continuity import PendingHoles
    spot = PendingHoles(SPOT, wait=1.0)
    # one connection lost 11-12 and 16 of a stream; the other, a little behind, brings them
    assert spot.open("X", detected_us=5, last_u=10, U=13, pu=None, now=0.0) is None
    assert spot.open("X", detected_us=6, last_u=15, U=17, pu=None, now=0.1) is None
    assert spot.fill("X", 16, 16, None)  # the later hole first
    assert spot.fill("X", 11, 12, None)
    assert spot.due(now=None) == []
    # past per_symbol held holes the oldest is confirmed at once
    capped = PendingHoles(SPOT, wait=1.0, per_symbol=2)
    for i in range(3):
        oldest = capped.open("X", detected_us=i, last_u=10 * i, U=10 * i + 5, pu=None, now=0.0)
    assert oldest is not None and oldest.detected_us == 0
    assert [h.detected_us for _, h in capped.due(now=1.0)] == [1, 2]


def test_a_break_on_a_connection_that_was_there_all_along_is_sequence():
    c = Continuity(SPOT)
    c.saw(1, 100)
    c.saw(2, 150)
    assert c.check("X", 1, 5, None, conn=1, received_us=200)[0] == START
    assert c.check("X", 6, 9, None, conn=2, received_us=210)[0] == OK       # copies take turns coming first
    assert c.check("X", 12, 14, None, conn=1, received_us=220) == (SEQUENCE, 9)  # both were there: sequence
    c.saw(3, 300)                                                           # a new connection, after the head
    assert c.check("X", 20, 25, None, conn=3, received_us=300) == (RECONNECT, 14)
