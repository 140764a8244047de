"""Binance payloads -> row values. Pure functions, no I/O; each returns None for a
payload that is not well formed (a malformed frame is counted and skipped by the caller, never a row).

Unknown fields are ignored (futures added `st` and `ps` in 2026). Levels are passed
through as sent; storage.columns converts and checks them in bulk.
"""
from __future__ import annotations

from typing import Any

# (event_time, symbol, U, u, pu, T, bids, asks); None where the payload kind has no such field
DepthRow = tuple[int | None, str, int | None, int, int | None, int | None, Any, Any]

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _int(v: object) -> bool:
    """An integer the int64 columns can hold (a larger one is malformed, not a crash)."""
    return type(v) is int and _I64_MIN <= v <= _I64_MAX


def spot_diff(data: Any) -> DepthRow | None:
    """Spot `<symbol>@depth@100ms`:

    {"e":"depthUpdate","E":1633998512068,"s":"NKNUSDT","U":499869750,"u":499869752,
     "b":[["0.35130000","6195.00000000"]],"a":[]}

    -> (event_time, symbol, U, u, pu, T, bids, asks)
    """
    try:
        e, E, s, U, u, b, a = data["e"], data["E"], data["s"], data["U"], data["u"], data["b"], data["a"]
    except (KeyError, TypeError):
        return None
    if e != "depthUpdate" or not (_int(E) and _int(U) and _int(u)) or type(s) is not str:
        return None
    if type(b) is not list or type(a) is not list:
        return None
    return E, s, U, u, None, None, b, a


def futures_depth(data: Any) -> DepthRow | None:
    """Futures diff `<symbol>@depth@100ms` and partial `<symbol>@depth20@100ms` (same shape):

    {"e":"depthUpdate","E":1626992741037,"T":1626992741024,"s":"SUSHIUSDT",
     "U":600859599090,"u":600859600917,"pu":600859598061,
     "b":[["7.5040","813"],["7.6090","0"]],"a":[["7.6150","1563"]]}
    """
    try:
        e, E, T, s, U, u, pu, b, a = (data["e"], data["E"], data["T"], data["s"], data["U"],
                                      data["u"], data["pu"], data["b"], data["a"])
    except (KeyError, TypeError):
        return None
    if e != "depthUpdate" or not (_int(E) and _int(T) and _int(U) and _int(u) and _int(pu)):
        return None
    if type(s) is not str or type(b) is not list or type(a) is not list:
        return None
    return E, s, U, u, pu, T, b, a


def spot_partial(data: Any, symbol: str) -> DepthRow | None:
    """Spot `<symbol>@depth20@100ms` carries no symbol, no event time and no U:

    {"lastUpdateId":160,"bids":[["0.0024","10"]],"asks":[["0.0026","100"]]}

    The symbol comes from the stream name.
    """
    try:
        last, b, a = data["lastUpdateId"], data["bids"], data["asks"]
    except (KeyError, TypeError):
        return None
    if not _int(last) or type(b) is not list or type(a) is not list:
        return None
    return None, symbol, None, last, None, None, b, a


def snapshot(data: Any, futures: bool) -> tuple[int, list, list, int | None, int | None] | None:
    """REST depth: {"lastUpdateId":N,"bids":[..],"asks":[..]} plus "E" and "T" on futures.

    -> (lastUpdateId, bids, asks, E, T)
    """
    try:
        last, b, a = data["lastUpdateId"], data["bids"], data["asks"]
    except (KeyError, TypeError):
        return None
    if not _int(last) or type(b) is not list or type(a) is not list:
        return None
    E = T = None
    if futures:
        E, T = data.get("E"), data.get("T")
        if not (_int(E) and _int(T)):
            return None
    return last, b, a, E, T
