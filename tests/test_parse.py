"""Parsing of every payload kind of both markets, real frames first."""
from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from handlers.process import parse, wire
from handlers.process.processor import DIFF
from simulator.server import load_capture
from storage.columns import DepthColumns
from tests.helpers import SHARED_DATA

SPOT_PARTIAL = b'{"lastUpdateId":160,"bids":[["0.0024","10"]],"asks":[["0.0026","100"]]}'
FUTURES_PARTIAL = (b'{"e":"depthUpdate","E":1571889248277,"T":1571889248276,"s":"BTCUSDT","U":390497796,'
                   b'"u":390497878,"pu":390497794,"b":[["7403.89","0.002"]],"a":[["7405.96","3.340"]],"st":1,"ps":"BTCUSDT"}')


def test_every_real_spot_diff_frame_parses():
    cap = load_capture(SHARED_DATA, "spot")
    frames = [orjson.loads(d) for _, name, d in cap.frames if "@depth" in name]
    assert len(frames) == 177
    for d in frames:
        E, s, U, u, pu, T, b, a = parse.spot_diff(d)
        assert (E, s, U, u, b, a) == (d["E"], d["s"], d["U"], d["u"], d["b"], d["a"])
        assert pu is None and T is None and U <= u


def test_every_real_futures_diff_frame_parses():
    cap = load_capture(SHARED_DATA, "futures")
    frames = [orjson.loads(d) for _, name, d in cap.frames if "@depth" in name]
    assert len(frames) > 500
    for d in frames:
        E, s, U, u, pu, T, b, a = parse.futures_depth(d)
        assert (E, T, s, U, u, pu) == (d["E"], d["T"], d["s"], d["U"], d["u"], d["pu"])


def test_real_snapshots_parse():
    for market in ("spot", "futures"):
        cap = load_capture(SHARED_DATA, market)
        for body in cap.snapshots.values():
            d = orjson.loads(body)
            last, b, a, E, T = parse.snapshot(d, futures=market == "futures")
            assert last == d["lastUpdateId"] and len(b) == len(d["bids"]) > 0
            assert (E, T) == ((d["E"], d["T"]) if market == "futures" else (None, None))


def test_partial_payloads_of_both_markets():
    assert parse.spot_partial(orjson.loads(SPOT_PARTIAL), "BNBBTC") == (
        None, "BNBBTC", None, 160, None, None, [["0.0024", "10"]], [["0.0026", "100"]])
    # unknown fields (st, ps: added in 2026) are ignored
    row = parse.futures_depth(orjson.loads(FUTURES_PARTIAL))
    assert row[:6] == (1571889248277, "BTCUSDT", 390497796, 390497878, 390497794, 1571889248276)


def test_spot_diff_is_not_a_futures_diff():
    spot = {"e": "depthUpdate", "E": 1, "s": "X", "U": 1, "u": 2, "b": [], "a": []}
    assert parse.spot_diff(spot) is not None
    assert parse.futures_depth(spot) is None  # no pu, no T


MALFORMED = [
    None, 1, "x", [], {}, {"e": "depthUpdate"},
    {"e": "trade", "E": 1, "s": "X", "U": 1, "u": 2, "b": [], "a": []},
    {"e": "depthUpdate", "E": "1", "s": "X", "U": 1, "u": 2, "b": [], "a": []},
    {"e": "depthUpdate", "E": 1, "s": "X", "U": 1.0, "u": 2, "b": [], "a": []},
    {"e": "depthUpdate", "E": 1, "s": "X", "U": True, "u": 2, "b": [], "a": []},
    {"e": "depthUpdate", "E": 1, "s": 5, "U": 1, "u": 2, "b": [], "a": []},
    {"e": "depthUpdate", "E": 1, "s": "X", "U": 1, "u": 2, "b": {}, "a": []},
    {"e": "depthUpdate", "E": 1, "s": "X", "U": 1, "u": 2, "b": [], "a": None},
]


def test_ids_beyond_int64_are_malformed_not_a_crash():
    """The id columns are int64: a larger id is refused by both paths (it used to pass
    parsing and fail later, in the Arrow conversion of a whole batch)."""
    for big in (1 << 63, -(1 << 63) - 1, 1 << 70):
        d = {"e": "depthUpdate", "E": 1, "T": 1, "s": "BTCUSDT", "U": 1, "u": big, "pu": 0, "b": [], "a": []}
        assert parse.spot_diff(d) is None and parse.futures_depth(d) is None
        raw = (b'{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":1,"s":"BTCUSDT",'
               b'"U":1,"u":%d,"b":[],"a":[]}}' % big)
        with pytest.raises(wire.DecodeError):
            wire.decode_frame(raw)
    edge = {"e": "depthUpdate", "E": 1, "s": "X", "U": (1 << 63) - 1, "u": (1 << 63) - 1, "b": [], "a": []}
    assert parse.spot_diff(edge) is not None


def test_malformed_payloads_are_refused():
    for d in MALFORMED:
        assert parse.spot_diff(d) is None, d
        assert parse.futures_depth(d) is None, d
        assert parse.spot_partial(d, "X") is None, d
        assert parse.snapshot(d, futures=True) is None, d


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(list("EsUuTbae") + ["pu"]), inner, max_size=9),
    max_leaves=20)


@given(json_values)
def test_parsers_never_raise(value):
    for result in (parse.spot_diff(value), parse.futures_depth(value), parse.spot_partial(value, "X"),
                   parse.snapshot(value, True), parse.snapshot(value, False)):
        assert result is None or isinstance(result, tuple)


def _general(raw: bytes, futures: bool, spot_partial: bool):
    msg = orjson.loads(raw)
    if spot_partial:
        return parse.spot_partial(msg["data"], msg["stream"].split("@")[0].upper())
    return (parse.futures_depth if futures else parse.spot_diff)(msg["data"])


def _typed_raw(raw: bytes, futures: bool, spot_partial: bool):
    msg = wire.decode_frame(raw)
    return wire.depth_row(msg.data, msg.stream.split("@")[0].upper(), futures, spot_partial)


def _typed(raw: bytes, futures: bool, spot_partial: bool):
    """The fast path's row, its level texts read as the general path reads them."""
    row = _typed_raw(raw, futures, spot_partial)
    return None if row is None else row[:6] + (orjson.loads(bytes(row[6])), orjson.loads(bytes(row[7])))


def test_fast_path_agrees_with_the_general_path_on_every_real_frame():
    for market in ("spot", "futures"):
        cap = load_capture(SHARED_DATA, market)
        frames = [b'{"stream":"%s","data":%s}' % (name.encode(), d) for _, name, d in cap.frames if "@depth" in name]
        assert frames
        for raw in frames:
            assert _typed(raw, market == "futures", False) == _general(raw, market == "futures", False)
    wrapped = b'{"stream":"btcusdt@depth20@100ms","data":%s}'
    assert _typed(wrapped % SPOT_PARTIAL, False, True) == _general(wrapped % SPOT_PARTIAL, False, True)
    assert _typed(wrapped % FUTURES_PARTIAL, True, False) == _general(wrapped % FUTURES_PARTIAL, True, False)


_BASE = {"e": "depthUpdate", "E": 1, "T": 1, "s": "BTCUSDT", "U": 5, "u": 9, "pu": 4,
         "b": [["1.5", "2"]], "a": []}
_value = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-2**65, 2**65), st.text(max_size=5), st.none(),
                   st.sampled_from(["depthUpdate", "BTCUSDT", "ETHUSDT"]),
                   st.lists(st.lists(st.one_of(st.text(max_size=4), st.sampled_from(["1.5", "0.002", "7e3"])),
                                     max_size=3), max_size=3))


@given(st.dictionaries(st.sampled_from(list(_BASE)), _value, max_size=4),
       st.lists(st.sampled_from(list(_BASE)), max_size=2))
def test_fast_path_never_accepts_what_the_general_path_refuses(changes, removed):
    """A payload with some fields changed or removed: msgspec's typed path yields a row
    only when the general path does, with the same scalars, and the rows written (or
    dropped) from its level texts are those the general path writes (or drops). The one
    difference: it checks level lists later, in bulk, so a row whose levels the general
    path refuses at once (not lists) is dropped and reported there."""
    data = {k: v for k, v in {**_BASE, **changes}.items() if k not in removed}
    raw = b'{"stream":"btcusdt@depth@100ms","data":' + json.dumps(data).encode() + b"}"  # any int size
    for futures in (False, True):
        parser = parse.futures_depth if futures else parse.spot_diff
        general = parser(data)
        if general is not None and general[1] != "BTCUSDT":
            general = None
        try:
            typed = _typed_raw(raw, futures, False)
        except wire.DecodeError:
            typed = None
        if typed is None:
            continue
        fast, slow = DepthColumns(DIFF), DepthColumns(DIFF)
        fast.append_raw(0, *typed)
        if general is None:  # only the level lists may be what the general path refused
            general = parser(dict(data, b=[], a=[]))
            assert general is not None and not (isinstance(data["b"], list) and isinstance(data["a"], list))
            assert typed[:6] == general[:6]
            table, dropped = fast.take()
            assert table.num_rows == 0 and dropped == [(0, *typed[:6])]
            continue
        assert typed[:6] == general[:6]
        slow.append(0, *general)
        (fast_table, fast_dropped), (slow_table, slow_dropped) = fast.take(), slow.take()
        assert fast_dropped == slow_dropped and fast_table.equals(slow_table)
