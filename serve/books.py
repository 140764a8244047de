"""Each symbol's order book at the replay clock, for REST `depth`.

A client that joins after the clock started asks for a snapshot and then applies the
stream from it; Binance answers with the book as it is now. So does the replay: the
symbol's latest recorded snapshot at or before the clock, with the recorded diffs up to
the clock applied (Binance's own rules: `research.book.Book`), `lastUpdateId` the last
applied `u`.

The diffs are kept as the walk passes them, still as text, and applied only when asked
or once FOLD_AFTER of them wait, so a symbol nobody asks for costs a list append a diff
and at most FOLD_AFTER diffs of memory beyond its book (AHEAD while it has no book). A new
snapshot replaces the book when it is at least as new, keeping the waiting diffs it does
not hold.

What the rebuilt book can vouch for is the snapshot's price range: beyond its deepest bid
and highest ask only the levels a diff touched are known, with unknown ones between, so
`depth` answers the levels inside that range. A recorded gap in the diffs (one that does
not continue the last) breaks the book until the next snapshot; meanwhile `depth` answers
the latest snapshot as recorded, as the collector would have had to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson
import pyarrow as pa

from markets import Market
from research.book import Book

FOLD_AFTER = 256   # diffs kept as text before they are applied to the symbol's book
AHEAD = 64         # without a book (no snapshot yet, or a gap since): the newest diffs kept, for the
                   # next snapshot (a stream runs ahead of a snapshot by a few diffs, not hundreds)


@dataclass
class Snapshot:
    """A recorded snapshot: its row of the `orderbooks` dataset (a one-row table: its levels
    become Python numbers only when the book is built)."""
    row: pa.Table

    @property
    def last_update_id(self) -> int:
        return self.row.column("lastUpdateId")[0].as_py()

    def answer(self, limit: int) -> Answer:
        r = self.row.to_pylist()[0]
        return Answer(r["lastUpdateId"], r["bid_prices"][:limit], r["bid_sizes"][:limit], r["ask_prices"][:limit],
                      r["ask_sizes"][:limit], r["event_time"] or 0, r["transaction_time"] or 0)


@dataclass(slots=True)
class Diff:
    U: int
    u: int
    pu: int | None
    bids: str               # the levels as Binance writes them, between the brackets
    asks: str
    event_time: int         # µs
    transaction_time: int   # µs


@dataclass
class Answer:
    """What REST depth answers: the book's levels (best first) and its update id and times."""
    last_update_id: int
    bid_prices: list[float]
    bid_sizes: list[float]
    ask_prices: list[float]
    ask_sizes: list[float]
    event_time: int
    transaction_time: int


@dataclass
class SymbolBook:
    market: Market
    snapshot: Snapshot | None = None
    book: Book | None = None          # the snapshot with the folded diffs applied (None: not built yet)
    waiting: list[Diff] = field(default_factory=list)
    broken: bool = False              # a diff did not continue the book: wait for the next snapshot
    last: Diff | None = None          # the last diff applied

    def on_snapshot(self, snap: Snapshot) -> None:
        if self.snapshot is not None and snap.last_update_id < self.snapshot.last_update_id:
            return  # older than the one the book stands on
        if self.book is not None and not self.broken and self.book.last_u is not None \
                and self.book.last_u > snap.last_update_id:
            return  # the book is already past it, and whole
        self.snapshot, self.book, self.broken, self.last = snap, None, False, None
        self.waiting = [d for d in self.waiting if not self.market.predates(d.u, snap.last_update_id)]

    def on_diff(self, diff: Diff) -> None:
        self.waiting.append(diff)
        if self.snapshot is None or self.broken:  # kept only for the next snapshot: the newest ones
            if len(self.waiting) >= 2 * AHEAD:
                del self.waiting[:-AHEAD]
        elif len(self.waiting) >= FOLD_AFTER:
            self.fold()

    def fold(self) -> None:
        """Apply the waiting diffs to the book (built from the snapshot on first use)."""
        snap = self.snapshot
        if snap is None or self.broken:
            return
        if self.book is None:
            r = snap.row.to_pylist()[0]
            self.book = Book(self.market)
            self.book.reset(r["lastUpdateId"], r["bid_prices"], r["bid_sizes"], r["ask_prices"], r["ask_sizes"])
        book = self.book
        for i, d in enumerate(self.waiting):
            verdict = book.offer(d.U, d.u, d.pu)
            if verdict == "stale":
                continue
            if verdict == "gap":  # the diffs from here on wait for the next snapshot
                self.broken, self.book, self.last = True, None, None
                self.waiting = self.waiting[i:]
                return
            bids, asks = _levels(d.bids), _levels(d.asks)
            book.apply(d.u, [p for p, _ in bids], [q for _, q in bids], [p for p, _ in asks], [q for _, q in asks])
            self.last = d
        self.waiting = []

    def answer(self, limit: int) -> Answer | None:
        """The book now, `limit` levels a side at most, inside the range it can vouch for;
        None without a whole one (no snapshot yet, or a recorded gap since)."""
        snap = self.snapshot
        if snap is None or self.broken:
            return None
        self.fold()
        book = self.book
        if self.broken:
            return None
        if book is None or self.last is None:  # nothing applied yet: the snapshot as recorded
            return snap.answer(limit)
        floor, ceiling = book.bid_floor, book.ask_ceiling
        bids = sorted((kv for kv in book.bids.items() if floor is None or kv[0] >= floor), key=lambda kv: -kv[0])[:limit]
        asks = sorted(kv for kv in book.asks.items() if ceiling is None or kv[0] <= ceiling)[:limit]
        assert book.last_u is not None
        return Answer(book.last_u, [p for p, _ in bids], [q for _, q in bids], [p for p, _ in asks],
                      [q for _, q in asks], self.last.event_time, self.last.transaction_time)


def _levels(text: str) -> list[tuple[float, float]]:
    return [(float(p), float(q)) for p, q in orjson.loads("[" + text + "]")]


class Books:
    """Every symbol's `SymbolBook`, by (market name, symbol)."""

    def __init__(self) -> None:
        self.symbols: dict[tuple[str, str], SymbolBook] = {}

    def of(self, market: Market, symbol: str) -> SymbolBook:
        key = (market.name, symbol)
        book = self.symbols.get(key)
        if book is None:
            book = self.symbols[key] = SymbolBook(market)
        return book
