"""Levels -> Arrow in bulk, and the row-by-row fallback that drops only malformed rows."""
from __future__ import annotations

import json

import orjson
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from storage.columns import DepthColumns, GapColumns, SnapshotColumns, levels_ok, levels_to_arrow, raw_levels
from storage.schemas import SCHEMAS

decimal = st.decimals(min_value=0, max_value=10**9, places=8, allow_nan=False, allow_infinity=False).map(
    lambda d: format(d, "f"))
levels = st.lists(st.tuples(decimal, decimal).map(list), max_size=30)


@given(st.lists(levels, max_size=20))
def test_levels_round_trip(rows):
    prices, sizes = levels_to_arrow(rows)
    assert prices.to_pylist() == [[float(p) for p, _ in r] for r in rows]
    assert sizes.to_pylist() == [[float(q) for _, q in r] for r in rows]


def test_depth_columns_drop_only_malformed_rows():
    buf = DepthColumns("diff_orderbooks")
    buf.append(1, 10, "A", 1, 2, None, None, [["1.5", "2"]], [])
    buf.append(2, 11, "A", 3, 4, None, None, [["1.5", "oops"]], [])
    buf.append(3, 12, "A", 5, 6, None, None, [["1.5"]], [])
    buf.append(4, 13, "A", 7, 8, None, None, [], [[1.0, 2.0]])
    buf.append(5, 14, "A", 9, 9, None, None, [], [["3", "4"], ["5", "6"]])
    table, dropped = buf.take()
    assert table.schema == SCHEMAS["diff_orderbooks"]
    assert table.column("final_update_id").to_pylist() == [2, 9]
    assert table.column("ask_prices").to_pylist() == [[], [3.0, 5.0]]
    assert [d[4] for d in dropped] == [4, 6, 8]
    assert len(buf) == 0


def test_snapshot_and_gap_columns():
    s = SnapshotColumns()
    s.append(1, 2, 99, levels_to_arrow([[["1", "2"]]]), raw_levels([b'[["3","4"]]']), 1000, "BTCUSDT", None, None)
    t = s.take()
    assert t.schema == SCHEMAS["orderbooks"]
    assert t.to_pylist()[0]["bid_prices"] == [1.0] and t.to_pylist()[0]["limit"] == 1000
    g = GapColumns()
    g.append(5, "BTCUSDT", None, 7, "start")
    assert g.take().to_pylist() == [{"detected_time": 5, "symbol": "BTCUSDT", "last_final_update_id": None,
                                     "next_first_update_id": 7, "reason": "start"}]


pairs = st.lists(st.tuples(decimal, decimal), max_size=30)


@given(st.lists(st.tuples(st.booleans(), pairs, pairs), max_size=40))
def test_fast_and_general_rows_interleave_in_arrival_order(rows):
    """append_raw (each side's JSON text) and append (orjson's lists) may alternate; the
    table keeps arrival order and the exact values."""
    buf = DepthColumns("diff_orderbooks")
    buf.RAW_LIMIT = 50  # force chunking inside the example too
    for i, (fast, bids, asks) in enumerate(rows):
        if fast:
            buf.append_raw(i, i, "A", i, i, None, None, orjson.dumps(bids), orjson.dumps(asks))
        else:
            buf.append(i, i, "A", i, i, None, None, [list(p) for p in bids], [list(p) for p in asks])
    table, dropped = buf.take()
    assert dropped == [] and len(buf) == 0
    assert table.schema == SCHEMAS["diff_orderbooks"]
    assert table.column("received_time").to_pylist() == list(range(len(rows)))
    assert table.column("bid_prices").to_pylist() == [[float(p) for p, _ in b] for _, b, _ in rows]
    assert table.column("ask_sizes").to_pylist() == [[float(q) for _, q in a] for _, _, a in rows]


def test_fast_path_rows_with_a_bad_decimal_drop_only_that_row():
    buf = DepthColumns("partial_orderbooks")
    buf.append_raw(1, None, "A", None, 10, None, None, b'[["1.5","2"]]', b'[["2.5","1"]]')
    buf.append_raw(2, None, "A", None, 11, None, None, b'[["1.5","x"]]', b"[]")
    buf.append_raw(3, None, "A", None, 12, None, None, b"[]", b'[["2.5","3"]]')
    table, dropped = buf.take()
    assert table.column("final_update_id").to_pylist() == [10, 12]
    assert table.column("ask_sizes").to_pylist() == [[1.0], [3.0]]
    assert [d[4] for d in dropped] == [11]


def test_a_string_where_a_pair_should_be_is_malformed():
    """Arrow reads any sequence as a list: "12" in place of a pair would have been the
    level (1, 2), and "" in place of a side an empty side."""
    buf = DepthColumns("diff_orderbooks")
    buf.append(1, 10, "A", 1, 2, None, None, ["12"], [])
    buf.append(2, 11, "A", 3, 4, None, None, "", [])
    buf.append(3, 12, "A", 5, 6, None, None, [("1", "2")], [])
    buf.append(4, 13, "A", 7, 8, None, None, [["1", "2"]], [])
    table, dropped = buf.take()
    assert table.column("final_update_id").to_pylist() == [8]
    assert [d[4] for d in dropped] == [2, 4, 6]
    assert not levels_ok(["12"]) and not levels_ok("")


def test_values_python_reads_but_arrow_does_not_are_malformed_not_a_crash():
    """float() takes "1_000", " 1" and Arabic-Indic digits; Arrow's conversion refuses
    them. Such a row used to pass the row-by-row check and then crash the whole build."""
    for odd in ("1_000", " 1", "1 ", "\u0661"):
        buf = DepthColumns("diff_orderbooks")
        buf.append(1, 10, "A", 1, 2, None, None, [[odd, "2"]], [])
        buf.append(2, 11, "A", 3, 4, None, None, [["1", "2"]], [])
        table, dropped = buf.take()
        assert table.column("final_update_id").to_pylist() == [4]
        assert [d[4] for d in dropped] == [2]
        assert not levels_ok([[odd, "2"]]) and levels_ok([["1", "2"]])


numbers = st.one_of(
    decimal,
    st.floats(allow_nan=False, allow_infinity=False).map(repr),  # 1e+16, -0.0, 5e-324
    st.integers(-10**30, 10**30).map(str),
    st.from_regex(r"\A[+-]?[0-9]{0,4}\.?[0-9]{0,4}([eE][+-]?[0-9]{1,3})?\Z"),  # some are not numbers
)


@given(st.lists(st.lists(st.tuples(numbers, numbers).map(list), max_size=8), max_size=12))
def test_raw_levels_equal_the_general_conversion(rows):
    """The bulk path over the JSON text gives exactly the doubles of the general path, or
    refuses the batch where the general path refuses a value too."""
    try:
        expected = levels_to_arrow(rows)
    except (ValueError, TypeError, pa.ArrowException):
        expected = None
    try:
        got = raw_levels([orjson.dumps(r) for r in rows])
    except (ValueError, pa.ArrowException):
        got = None
    if expected is None:
        assert got is None
    else:
        assert got is not None and got[0].equals(expected[0]) and got[1].equals(expected[1])


odd_text = st.text(alphabet='0123456789.-+eE ,|[]"x_\u0661', max_size=6)
level_value = st.one_of(decimal, odd_text, st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.none())
level_list = st.one_of(
    st.lists(st.one_of(st.lists(level_value, min_size=2, max_size=2), st.lists(level_value, max_size=3), level_value),
             max_size=4),
    st.none(), odd_text, st.integers(), st.dictionaries(st.text(max_size=2), level_value, max_size=2))


@given(st.lists(st.tuples(level_list, level_list, st.booleans(), st.booleans()), min_size=1, max_size=12))
def test_fast_path_writes_and_drops_exactly_what_the_general_path_does(rows):
    """Any JSON as a row's level lists, compact or spaced, escaped or not: the fast path
    (JSON text, checked in bulk) writes the same rows with the same values and drops the
    same rows as the general path (orjson's lists, checked row by row); it never raises."""
    fast, general = DepthColumns("diff_orderbooks"), DepthColumns("diff_orderbooks")
    for i, (bids, asks, spaced, ascii_only) in enumerate(rows):
        seps = (", ", ": ") if spaced else (",", ":")
        texts = [json.dumps(side, separators=seps, ensure_ascii=ascii_only).encode() for side in (bids, asks)]
        fast.append_raw(i, i, "A", i, i, None, None, *texts)
        loaded = []
        for text in texts:
            try:
                loaded.append(orjson.loads(text))
            except orjson.JSONDecodeError:  # ints beyond 64 bits
                loaded.append(None)
        general.append(i, i, "A", i, i, None, None, *loaded)
    (fast_table, fast_dropped), (general_table, general_dropped) = fast.take(), general.take()
    assert fast_dropped == general_dropped
    assert fast_table.equals(general_table)
