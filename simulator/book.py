"""Simulated order books whose update ids behave as Binance's do.

Spot: one counter per symbol, +1 per engine update, so a diff event's `U` is the
previous event's `u` + 1. Futures: one counter for the whole market, so a symbol's ids
skip (other symbols' updates come between) and events are chained by `pu`.

Prices are integers in ticks, rendered as decimal strings like Binance's.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class IdSource:
    """Update ids: per symbol on spot, one global sequence on futures."""

    futures: bool
    rng: random.Random
    _global: int = 600_000_000_000

    def first(self) -> int:
        return self._global if self.futures else self.rng.randrange(10_000_000, 900_000_000)

    def next(self, current: int) -> int:
        if self.futures:
            self._global += self.rng.randint(1, 40)
            return self._global
        return current + 1


def fmt_units(units: int, decimals: int) -> str:
    whole, frac = divmod(units, 10 ** decimals)
    return f"{whole}.{frac:0{decimals}d}" if decimals else str(whole)


@dataclass
class Book:
    symbol: str
    ids: IdSource
    rng: random.Random
    price_decimals: int = 2
    qty_decimals: int = 8
    mid: int = 0
    last_id: int = 0
    bids: dict[int, int] = field(default_factory=dict)
    asks: dict[int, int] = field(default_factory=dict)

    @classmethod
    def create(cls, symbol: str, ids: IdSource, rng: random.Random, futures: bool, levels: int = 200) -> "Book":
        book = cls(symbol, ids, rng, price_decimals=rng.choice((2, 4)), qty_decimals=3 if futures else 8)
        book.mid = rng.randrange(10_000, 5_000_000)
        book.last_id = ids.first()
        for k in range(1, levels + 1):
            book.bids[book.mid - k] = book._qty()
            book.asks[book.mid + k] = book._qty()
        return book

    def _qty(self) -> int:
        return self.rng.randrange(1, 50_000) * 10 ** max(0, self.qty_decimals - 3)

    def update(self) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
        """One engine update: returns (update id, changed bids, changed asks); qty 0 removes."""
        rng = self.rng
        bids: list[tuple[int, int]] = []
        asks: list[tuple[int, int]] = []
        roll = rng.random()
        if roll < 0.05:  # the price moves one tick; the level it crosses is emptied
            if rng.random() < 0.5:
                self.mid += 1
                if self.asks.pop(self.mid, None) is not None:
                    asks.append((self.mid, 0))
            else:
                self.mid -= 1
                if self.bids.pop(self.mid, None) is not None:
                    bids.append((self.mid, 0))
        side, out, sign = (self.bids, bids, -1) if rng.random() < 0.5 else (self.asks, asks, 1)
        price = self.mid + sign * min(300, 1 + int(rng.expovariate(0.08)))
        qty = 0 if (rng.random() < 0.25 and price in side) else self._qty()
        if qty:
            side[price] = qty
        else:
            side.pop(price, None)
        out.append((price, qty))
        self.last_id = self.ids.next(self.last_id)
        return self.last_id, bids, asks

    def levels(self, side: str, limit: int) -> list[list[str]]:
        if side == "bids":
            prices = sorted(self.bids, reverse=True)[:limit]
            book = self.bids
        else:
            prices = sorted(self.asks)[:limit]
            book = self.asks
        return [[fmt_units(p, self.price_decimals), fmt_units(book[p], self.qty_decimals)] for p in prices]

    def render(self, changes: dict[int, int], descending: bool) -> list[list[str]]:
        return [[fmt_units(p, self.price_decimals), fmt_units(q, self.qty_decimals)]
                for p, q in sorted(changes.items(), reverse=descending)]
