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

from storage.columns import decimal_text  # noqa: F401  (the rule's home; tests and callers use it from here too)

SCHEMA_ID = 1
DIFF, PARTIAL = 10003, 10002  # templateId of each message
_HEADER = struct.Struct("<HHHH")
_DIFF_ROOT = struct.Struct("<qqqbb")
_PARTIAL_ROOT = struct.Struct("<qqbb")
_GROUP = struct.Struct("<HH")
_LEVEL = struct.Struct("<qq")


class SbeError(ValueError):
    """A frame this decoder cannot read; never a row."""


def _parse(frame: bytes) -> tuple[int, int, int | None, int, int, int, list[tuple[int, int, int]], str]:
    """(template, event µs, first id or None, final id, price exponent, qty exponent,
    [(entry size, count, offset) of the bids, of the asks], symbol)."""
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
        groups = []
        for _ in range(2):
            size, n = _GROUP.unpack_from(frame, pos)
            pos += _GROUP.size
            if size < _LEVEL.size or pos + size * n > len(frame):
                raise SbeError("a level group runs past the frame")
            groups.append((size, n, pos))
            pos += size * n
        length = frame[pos]
        symbol = frame[pos + 1:pos + 1 + length]
        if len(symbol) != length:
            raise SbeError("the symbol runs past the frame")
        return template, event, first, final, p_exp, q_exp, groups, symbol.decode()
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise SbeError(f"cut short or not SBE: {e}") from None


def decode(frame: bytes) -> tuple[int, tuple]:
    """(templateId, row): row is (event_time µs, symbol, first_update_id, final_update_id,
    None, None, bids, asks), each side [[price text, qty text], ...]; a partial frame's
    first_update_id is None and its final_update_id the book update id."""
    template, event, first, final, p_exp, q_exp, groups, symbol = _parse(frame)
    sides = [[[decimal_text(price, p_exp), decimal_text(qty, q_exp)]
              for price, qty in (_LEVEL.unpack_from(frame, start + k * size) for k in range(n))]
             for size, n, start in groups]
    return template, (event, symbol, first, final, None, None, sides[0], sides[1])


def decode_packed(frame: bytes) -> tuple[int, tuple, tuple[int, int] | None]:
    """As `decode`, without making a Python object per level: (templateId, row, exponents).
    When every level is just (price, qty), 16 bytes (as schema 1 has them), each side of
    the row is those bytes as they stand in the frame, and `exponents` (price, qty):
    `storage.columns.DepthColumns.append_packed` converts them, many rows at once. When a
    newer schema adds fields to a level, the row is `decode`'s and `exponents` None."""
    template, event, first, final, p_exp, q_exp, groups, symbol = _parse(frame)
    if groups[0][0] != _LEVEL.size or groups[1][0] != _LEVEL.size:
        return decode(frame) + (None,)
    (_, nb, b), (_, na, a) = groups
    return template, (event, symbol, first, final, None, None, frame[b:b + 16 * nb], frame[a:a + 16 * na]), (p_exp, q_exp)
