"""Spot depth as Binance's SBE streams send it: the encoder that `replay --spot-sbe-port` and
the simulator use (layout in `handlers/process/sbe.py`; the schema in `serve/sbe_stream.xml`).
Written apart from the collector's decoder, so that each checks the other;
tests/test_sbe.py also holds the decoder to an independent SBE implementation."""
from __future__ import annotations

import struct
from decimal import Decimal
from typing import Any

from handlers.process.sbe import DIFF, PARTIAL, SCHEMA_ID

_LEVEL = struct.Struct("<qq")


def _group(levels: list[tuple[int, int]], block: int = 16) -> bytes:
    pad = bytes(block - _LEVEL.size)
    return struct.pack("<HH", block, len(levels)) + b"".join(_LEVEL.pack(p, q) + pad for p, q in levels)


def _frame(template: int, root: bytes, bids: list[tuple[int, int]], asks: list[tuple[int, int]], symbol: str,
           extra_root: bytes = b"", block: int = 16, version: int = 0) -> bytes:
    root += extra_root  # what a newer schema version would add (a decoder must skip it)
    name = symbol.encode()
    return (struct.pack("<HHHH", len(root), template, SCHEMA_ID, version) + root + _group(bids, block)
            + _group(asks, block) + bytes([len(name)]) + name)


def diff(event_us: int, first: int, last: int, price_exp: int, qty_exp: int, bids: list[tuple[int, int]],
         asks: list[tuple[int, int]], symbol: str, **newer: Any) -> bytes:
    """A DepthDiffStreamEvent; prices and sizes as mantissas (value = mantissa x 10^exp)."""
    return _frame(DIFF, struct.pack("<qqqbb", event_us, first, last, price_exp, qty_exp), bids, asks, symbol, **newer)


def depth(event_us: int, update_id: int, price_exp: int, qty_exp: int, bids: list[tuple[int, int]],
          asks: list[tuple[int, int]], symbol: str, **newer: Any) -> bytes:
    """A DepthSnapshotStreamEvent (the `@depth20` stream)."""
    return _frame(PARTIAL, struct.pack("<qqbb", event_us, update_id, price_exp, qty_exp), bids, asks, symbol, **newer)


def mantissas(levels: list[list[str]]) -> tuple[int, int, list[tuple[int, int]]]:
    """[[price text, qty text], ...] -> (price exponent, qty exponent, [(price, qty) mantissas]):
    one exponent a side of the message, the smallest any of its values needs (exact)."""
    if not levels:
        return 0, 0, []
    prices = [Decimal(p) for p, _ in levels]
    sizes = [Decimal(q) for _, q in levels]
    pe = min(min(int(d.as_tuple().exponent) for d in prices), 0)
    qe = min(min(int(d.as_tuple().exponent) for d in sizes), 0)
    return pe, qe, [(int(p.scaleb(-pe)), int(q.scaleb(-qe))) for p, q in zip(prices, sizes, strict=True)]
