"""An order book rebuilt from a REST snapshot plus the diffs after it, following Binance's
documented procedure for keeping a local book: skip the diffs the snapshot already holds,
start from the one that joins it, then apply diffs while each continues the one before
(the market's rules: `Market.predates`, `Market.joins`, `Market.continues`)."""
from __future__ import annotations

from typing import Sequence

from markets import Market

Levels = Sequence[float]  # one side's prices or sizes, in the order sent


class Book:
    __slots__ = ("bids", "asks", "last_u", "synced", "snapshot_id", "market", "_best_bid", "_best_ask", "negatives",
                 "bid_floor", "ask_ceiling", "known_beyond")

    def __init__(self, market: Market):
        self.market = market
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}
        self.last_u: int | None = None
        self.snapshot_id: int | None = None
        self.synced = False  # a diff joined the snapshot and the chain has held since
        # best prices cached between diffs (None: recompute); verify checks every diff for a
        # crossed book, and a full scan per diff made it quadratic in the book's depth
        self._best_bid: float | None = None
        self._best_ask: float | None = None
        self.negatives = 0  # negative sizes the last reset() or apply() brought in
        # how deep the book is known: the snapshot it started from held no bid below its
        # deepest bid and no ask above its highest ask; past them only what a diff touched is known
        self.bid_floor: float | None = None
        self.ask_ceiling: float | None = None
        self.known_beyond: set[float] = set()  # prices past them that a diff set

    def reset(self, last_update_id: int, bid_p: Levels, bid_s: Levels, ask_p: Levels, ask_s: Levels) -> None:
        self.bids = dict(zip(bid_p, bid_s, strict=True))
        self.asks = dict(zip(ask_p, ask_s, strict=True))
        self.snapshot_id, self.last_u, self.synced = last_update_id, last_update_id, False
        self._best_bid = self._best_ask = None
        self.negatives = sum(1 for q in bid_s if q < 0) + sum(1 for q in ask_s if q < 0)
        self.bid_floor = min(bid_p) if bid_p else None
        self.ask_ceiling = max(ask_p) if ask_p else None
        self.known_beyond = set()

    def offer(self, U: int, u: int, pu: int | None) -> str:
        """How a diff relates to the book: 'stale' (skip), 'apply', or 'gap' (resync needed)."""
        if self.snapshot_id is None:
            return "gap"
        L, m = self.snapshot_id, self.market
        if not self.synced:
            if m.predates(u, L):
                return "stale"
            return "apply" if m.joins(U, u, L) else "gap"
        last_u = self.last_u
        assert last_u is not None  # synced: a diff was applied
        if u <= last_u:
            return "stale"
        return "apply" if m.continues(U, pu, last_u) else "gap"

    def apply(self, u: int, bid_p: Levels, bid_s: Levels, ask_p: Levels, ask_s: Levels) -> None:
        self._best_bid, neg_bids = _apply_side(self.bids, bid_p, bid_s, self._best_bid, 1)
        self._best_ask, neg_asks = _apply_side(self.asks, ask_p, ask_s, self._best_ask, -1)
        self.negatives = neg_bids + neg_asks
        self.last_u, self.synced = u, True
        if self.bid_floor is not None:
            self.known_beyond.update(p for p in bid_p if p < self.bid_floor)
        if self.ask_ceiling is not None:
            self.known_beyond.update(p for p in ask_p if p > self.ask_ceiling)

    def top(self, n: int) -> tuple[list, list]:
        bids = sorted(self.bids.items(), key=lambda kv: -kv[0])[:n]
        asks = sorted(self.asks.items())[:n]
        return bids, asks

    def crossed(self) -> bool:
        if not (self.bids and self.asks):
            return False
        if self._best_bid is None:
            self._best_bid = max(self.bids)
        if self._best_ask is None:
            self._best_ask = min(self.asks)
        return self._best_bid >= self._best_ask

    def negative(self) -> bool:
        """Whether the last reset() or apply() brought in a negative size."""
        return self.negatives > 0


def _apply_side(side: dict, prices: Levels, sizes: Levels, best: float | None, sign: int) -> tuple[float | None, int]:
    """Apply one side's levels; returns the side's best price (None: unknown, recomputed
    when asked) and the number of negative sizes applied. `sign` is 1 for bids (higher is
    better), -1 for asks."""
    negatives = 0
    for p, q in zip(prices, sizes, strict=True):
        if q == 0:
            side.pop(p, None)
            if p == best:
                best = None
        else:
            side[p] = q
            negatives += q < 0
            if best is not None and sign * (p - best) > 0:
                best = p
    return best, negatives


def agreement(book: Book, bid_p: Levels, bid_s: Levels, ask_p: Levels, ask_s: Levels,
              skip: tuple[Levels, Levels] = ((), ())) -> tuple[int, int, list[tuple[str, float, float | None, float | None]]]:
    """(levels that agree, levels compared, the ones that do not: (side, price, book's size,
    snapshot's size)) within the price range both books know: the snapshot's, and no deeper
    than the snapshot the rebuilt book started from (`bid_floor`, `ask_ceiling`); leaving
    out the prices in `skip` (bids, asks): the levels a diff straddling the snapshot's id
    may have changed."""
    same = total = 0
    wrong = []
    for side, mine, prices, sizes, left_out in (("bid", book.bids, bid_p, bid_s, skip[0]),
                                                ("ask", book.asks, ask_p, ask_s, skip[1])):
        if not prices:
            continue
        lo, hi = min(prices), max(prices)
        known_lo, known_hi = lo, hi  # the part of the snapshot's range the rebuilt book knows whole
        if side == "bid" and book.bid_floor is not None:
            known_lo = max(lo, book.bid_floor)
        if side == "ask" and book.ask_ceiling is not None:
            known_hi = min(hi, book.ask_ceiling)
        beyond = {p for p in book.known_beyond if lo <= p <= hi}
        theirs = {p: q for p, q in zip(prices, sizes, strict=True) if known_lo <= p <= known_hi or p in beyond}
        keys = (set(theirs) | {p for p in mine if known_lo <= p <= known_hi or p in beyond}) - set(left_out)
        total += len(keys)
        for p in keys:
            if mine.get(p) == theirs.get(p):
                same += 1
            else:
                wrong.append((side, p, mine.get(p), theirs.get(p)))
    return same, total, wrong
