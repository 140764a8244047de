"""Typed decoding of depth frames with msgspec: the processor's fast path.

orjson makes three Python objects per price level (a list and two strings) that must
then be checked one by one; at depth20 that was most of the processor's time. msgspec
decodes straight into the shapes below and checks every type while it parses (in C), so
a frame that decodes is well formed down to each level being a pair of strings, and
nothing is walked twice. The level pairs go to the column buffers as they are.

Both markets' depth payloads fit one `Data` (a payload's missing fields stay None):

    {"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":..,"s":..,"U":..,"u":..,"b":[..],"a":[..]}}
    {"stream":"btcusdt@depth20@100ms","data":{"lastUpdateId":..,"bids":[..],"asks":[..]}}   (spot partial)
    futures diff and partial: as the spot diff, plus "T" and "pu"

A frame this refuses (a control reply, serverShutdown, anything malformed) is judged by
the processor's general path, exactly as before (SPEC rules 1 and 3).
"""
from __future__ import annotations

from typing import Annotated, Optional

import msgspec

Pair = tuple[str, str]
Int64 = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]  # what the columns hold
DecodeError = msgspec.DecodeError  # ValidationError is a subclass


class Data(msgspec.Struct):
    e: Optional[str] = None
    E: Optional[Int64] = None
    T: Optional[Int64] = None
    s: Optional[str] = None
    U: Optional[Int64] = None
    u: Optional[Int64] = None
    pu: Optional[Int64] = None
    b: Optional[list[Pair]] = None
    a: Optional[list[Pair]] = None
    lastUpdateId: Optional[Int64] = None
    bids: Optional[list[Pair]] = None
    asks: Optional[list[Pair]] = None


class Frame(msgspec.Struct):
    stream: str
    data: Data


decode_frame = msgspec.json.Decoder(Frame).decode


def depth_row(d: Data, symbol: str, futures: bool, spot_partial: bool):
    """(event_time, symbol, U, u, pu, T, bids, asks) as `handlers.parse` returns it, or
    None when a field the payload kind needs is missing or the symbol is not the stream's."""
    if spot_partial:
        if d.lastUpdateId is None or d.bids is None or d.asks is None:
            return None
        return None, symbol, None, d.lastUpdateId, None, None, d.bids, d.asks
    if (d.e != "depthUpdate" or d.s != symbol or d.E is None or d.U is None or d.u is None
            or d.b is None or d.a is None):
        return None
    if futures:
        if d.T is None or d.pu is None:
            return None
        return d.E, symbol, d.U, d.u, d.pu, d.T, d.b, d.a
    return d.E, symbol, d.U, d.u, None, None, d.b, d.a
