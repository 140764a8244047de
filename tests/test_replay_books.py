"""The replay's books for REST depth (`serve.books`): the book at the replay clock is the
latest snapshot with every later diff applied by Binance's rules, whatever order the walk
meets them in (a stream running ahead of its snapshot), as `research.book.Book` rebuilds
it from the same rows; a gap leaves no book until the next snapshot; memory stays bounded."""
from __future__ import annotations

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from markets import MARKETS
from research.book import Book
from serve import books
from serve.books import Diff, Snapshot, SymbolBook
from storage.schemas import SCHEMAS

SPOT, FUTURES = MARKETS["spot"], MARKETS["futures"]


def snapshot(last_id: int, bids: dict[float, float], asks: dict[float, float]) -> Snapshot:
    row = {name: None for name in SCHEMAS["orderbooks"].names}
    row.update(lastUpdateId=last_id, symbol="BTCUSDT", received_time=0,
               bid_prices=sorted(bids, reverse=True), bid_sizes=[bids[p] for p in sorted(bids, reverse=True)],
               ask_prices=sorted(asks), ask_sizes=[asks[p] for p in sorted(asks)])
    return Snapshot(pa.Table.from_pylist([row], schema=SCHEMAS["orderbooks"]))


def diff(U: int, u: int, bids: list[tuple[float, float]], asks: list[tuple[float, float]], pu: int | None = None) -> Diff:
    text = lambda levels: ",".join('["%r","%r"]' % (p, q) for p, q in levels)  # noqa: E731
    return Diff(U, u, pu, text(bids), text(asks), u * 1000, u * 1000)


LEVELS = st.lists(st.tuples(st.integers(90, 110).map(float), st.sampled_from([0.0, 1.0, 2.5, 7.0])), max_size=4)


@given(st.lists(st.tuples(LEVELS, LEVELS), min_size=1, max_size=40), st.integers(0, 39), st.integers(0, 5))
def test_the_book_at_the_clock_is_the_snapshot_with_the_later_diffs_applied(updates, at, ahead):
    """Spot diffs 1..n; the snapshot holds the book at id `at`, and the walk meets it after
    `ahead` diffs newer than it (a stream running ahead of its REST snapshot)."""
    at = min(at, len(updates) - 1)
    truth = Book(SPOT)
    truth.reset(0, [100.0, 99.0, 95.0, 90.0], [1.0, 1.0, 1.0, 1.0], [101.0, 102.0, 110.0], [1.0, 1.0, 1.0])
    states = {}
    diffs = []
    for u, (b, a) in enumerate(updates, start=1):
        diffs.append(diff(u, u, b, a))
        truth.apply(u, [p for p, _ in b], [q for _, q in b], [p for p, _ in a], [q for _, q in a])
        states[u] = (dict(truth.bids), dict(truth.asks))
    bids, asks = states.get(at, ({100.0: 1.0, 99.0: 1.0, 95.0: 1.0, 90.0: 1.0}, {101.0: 1.0, 102.0: 1.0, 110.0: 1.0}))
    book = SymbolBook(SPOT)
    seen = min(len(diffs), at + ahead)
    for d in diffs[:seen]:
        book.on_diff(d)
    book.on_snapshot(snapshot(at, bids, asks))
    for d in diffs[seen:]:
        book.on_diff(d)
    got = book.answer(1000)
    assert got is not None
    last = len(updates) if len(updates) > at else at
    assert got.last_update_id == last
    floor, ceiling = min(bids, default=None), max(asks, default=None)
    want_bids, want_asks = states.get(last, (bids, asks))
    assert dict(zip(got.bid_prices, got.bid_sizes, strict=True)) == {
        p: q for p, q in want_bids.items() if floor is not None and p >= floor}
    assert dict(zip(got.ask_prices, got.ask_sizes, strict=True)) == {
        p: q for p, q in want_asks.items() if ceiling is not None and p <= ceiling}
    assert got.bid_prices == sorted(got.bid_prices, reverse=True) and got.ask_prices == sorted(got.ask_prices)


def test_a_gap_leaves_no_book_until_the_next_snapshot():
    book = SymbolBook(FUTURES)
    book.on_snapshot(snapshot(10, {100.0: 1.0}, {101.0: 1.0}))
    book.on_diff(diff(9, 12, [(100.0, 2.0)], [], pu=8))      # joins: U <= 10 <= u
    book.on_diff(diff(13, 15, [(99.0, 1.0)], [], pu=12))     # continues
    assert book.answer(10).last_update_id == 15
    book.on_diff(diff(20, 22, [], [], pu=18))                # does not continue 15
    assert book.answer(10) is None
    book.on_diff(diff(23, 25, [(100.0, 4.0)], [], pu=22))
    book.on_snapshot(snapshot(24, {100.0: 3.0}, {101.0: 1.0}))  # the stream is ahead of it: 23..25 joins
    got = book.answer(10)
    assert got.last_update_id == 25 and dict(zip(got.bid_prices, got.bid_sizes, strict=True)) == {100.0: 4.0}


def test_waiting_diffs_stay_bounded():
    book = SymbolBook(SPOT)
    for u in range(1, 10_000):  # no snapshot yet: only the newest few are kept, for the next one
        book.on_diff(diff(u, u, [(100.0, float(u))], []))
    assert len(book.waiting) < 2 * books.AHEAD
    book.on_snapshot(snapshot(9_990, {100.0: 1.0}, {101.0: 1.0}))
    for u in range(10_000, 20_000):  # with one: applied every FOLD_AFTER
        book.on_diff(diff(u, u, [(100.0, float(u))], []))
    assert len(book.waiting) < books.FOLD_AFTER
    got = book.answer(5)
    assert got.last_update_id == 19_999 and got.bid_sizes == [19_999.0]
