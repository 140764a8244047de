"""Typed decoding of depth frames with msgspec: the processor's fast path.

orjson makes three Python objects per price level (a list and two strings) that must
then be checked one by one; at depth20 that was most of the processor's time. msgspec
decodes the scalars into the shapes below and checks their types while it parses (in
C). The level lists it leaves as JSON text (`msgspec.Raw`, no object per level): the
column buffers check and convert them in bulk (`storage.columns.raw_levels`), and a row
whose levels are not pairs of decimal strings is dropped there and reported, as the
general path does (a malformed frame is never a row; a dropped diff leaves a `malformed` gap row).

Both markets' depth payloads fit one `Data` (a payload's missing fields stay None, a
missing level list stays an empty Raw):

    {"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":..,"s":..,"U":..,"u":..,"b":[..],"a":[..]}}
    {"stream":"btcusdt@depth20@100ms","data":{"lastUpdateId":..,"bids":[..],"asks":[..]}}   (spot partial)
    futures diff and partial: as the spot diff, plus "T" and "pu"

A frame this refuses (a control reply, serverShutdown, anything malformed) is judged by
the processor's general path, exactly as before (a well-formed message is never dropped; a malformed one is counted and skipped).
"""
from __future__ import annotations

from typing import Annotated, Optional

import msgspec

from handlers.process.parse import DepthRow

_MISSING = msgspec.Raw()
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
    b: msgspec.Raw = _MISSING
    a: msgspec.Raw = _MISSING
    lastUpdateId: Optional[Int64] = None
    bids: msgspec.Raw = _MISSING
    asks: msgspec.Raw = _MISSING


class Frame(msgspec.Struct):
    stream: str
    data: Data


decode_frame = msgspec.json.Decoder(Frame).decode

def depth_row(d: Data, symbol: str, futures: bool, spot_partial: bool) -> DepthRow | None:
    """(event_time, symbol, U, u, pu, T, bids, asks) as `handlers.process.parse` returns it (the
    levels as JSON text), or None when a field the payload kind needs is missing or the
    symbol is not the stream's.

    The processor's per-frame loop (`FrameProcessor.on_frames`) makes these checks
    written out, for speed; this is their plain statement, and tests/test_fastpath.py
    holds the loop to it."""
    if spot_partial:
        if d.lastUpdateId is None or not d.bids or not d.asks:
            return None
        return None, symbol, None, d.lastUpdateId, None, None, d.bids, d.asks
    if (d.e != "depthUpdate" or d.s != symbol or d.E is None or d.U is None or d.u is None
            or not d.b or not d.a):
        return None
    if futures:
        if d.T is None or d.pu is None:
            return None
        return d.E, symbol, d.U, d.u, d.pu, d.T, d.b, d.a
    return d.E, symbol, d.U, d.u, None, None, d.b, d.a


class Snapshot(msgspec.Struct):
    """REST depth: {"lastUpdateId":N,"bids":[..],"asks":[..]}, plus "E" and "T" on futures."""
    lastUpdateId: Int64
    bids: msgspec.Raw = _MISSING
    asks: msgspec.Raw = _MISSING
    E: Optional[Int64] = None
    T: Optional[Int64] = None


decode_snapshot = msgspec.json.Decoder(Snapshot).decode
