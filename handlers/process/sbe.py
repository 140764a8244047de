"""Spot SBE market data (`feed = sbe`): the two depth messages of schema 1 (`stream_1_0`),
decoded into the rows the JSON streams give.

A frame is one binary WebSocket message, no stream wrapper; little endian throughout:

    header    blockLength u16, templateId u16, schemaId u16, version u16
    root      (blockLength bytes; the fields below first, anything a newer version adds after)
      10003 DepthDiffStreamEvent      eventTime i64 (µs), firstBookUpdateId i64, lastBookUpdateId i64,
                                      priceExponent i8, qtyExponent i8
      10002 DepthSnapshotStreamEvent  eventTime i64 (µs), bookUpdateId i64, priceExponent i8, qtyExponent i8
    bids, asks   groupSize16Encoding (blockLength u16, numInGroup u16), then numInGroup entries
                 of blockLength bytes: price i64 mantissa, qty i64 mantissa, ...
    symbol    varString8: length u8, UTF-8 bytes

e.g. a diff of BTCUSDT, one bid 123.45 x 1, no ask (hex, spaces between the parts):
    1a00 1327 0100 0000 | 404a05faeb610600 0a00000000000000 0c00000000000000 fe f8 |
    1000 0100 3930000000000000 00e1f50500000000 | 1000 0000 | 07 42544355534454

Every length is read from the frame (header and group blockLength), so fields a newer
schema version adds are skipped; a schema id other than 1, a template other than these
two, or a frame cut short is refused (`SbeError`). A value is mantissa x 10^exponent: it
is written out as its exact decimal text, which Arrow casts to the same double as the
JSON streams' text gives (dividing the mantissa by 10^-exponent would too).
"""
from __future__ import annotations

import struct

SCHEMA_ID = 1
DIFF, PARTIAL = 10003, 10002  # templateId of each message
_HEADER = struct.Struct("<HHHH")
_DIFF_ROOT = struct.Struct("<qqqbb")
_PARTIAL_ROOT = struct.Struct("<qqbb")
_GROUP = struct.Struct("<HH")
_LEVEL = struct.Struct("<qq")


class SbeError(ValueError):
    """A frame this decoder cannot read; never a row."""


def decimal_text(mantissa: int, exponent: int) -> str:
    """mantissa x 10^exponent, exactly, as decimal text ("123.45" for 12345, -2)."""
    if exponent >= 0:
        return str(mantissa * 10 ** exponent)
    digits = str(abs(mantissa)).rjust(1 - exponent, "0")
    return ("-" if mantissa < 0 else "") + digits[:exponent] + "." + digits[exponent:]


def decode(frame: bytes) -> tuple[int, tuple]:
    """(templateId, row): row is (event_time µs, symbol, first_update_id, final_update_id,
    None, None, bids, asks), each side [[price text, qty text], ...]; a partial frame's
    first_update_id is None and its final_update_id the book update id."""
    try:
        block, template, schema, _version = _HEADER.unpack_from(frame, 0)
        if schema != SCHEMA_ID:
            raise SbeError(f"schema id {schema}, not {SCHEMA_ID}")
        pos = _HEADER.size
        if template == DIFF and block >= _DIFF_ROOT.size:
            event, first, final, p_exp, q_exp = _DIFF_ROOT.unpack_from(frame, pos)
        elif template == PARTIAL and block >= _PARTIAL_ROOT.size:
            event, final, p_exp, q_exp = _PARTIAL_ROOT.unpack_from(frame, pos)
            first = None
        else:
            raise SbeError(f"template {template} with a root of {block} bytes")
        pos += block
        sides = []
        for _ in range(2):
            size, n = _GROUP.unpack_from(frame, pos)
            pos += _GROUP.size
            if size < _LEVEL.size or pos + size * n > len(frame):
                raise SbeError("a level group runs past the frame")
            levels = []
            for _ in range(n):
                price, qty = _LEVEL.unpack_from(frame, pos)
                levels.append([decimal_text(price, p_exp), decimal_text(qty, q_exp)])
                pos += size
            sides.append(levels)
        length = frame[pos]
        symbol = frame[pos + 1:pos + 1 + length]
        if len(symbol) != length:
            raise SbeError("the symbol runs past the frame")
        return template, (event, symbol.decode(), first, final, None, None, sides[0], sides[1])
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise SbeError(f"cut short or not SBE: {e}") from None
