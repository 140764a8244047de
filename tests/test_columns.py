"""Levels -> Arrow in bulk, and the row-by-row fallback that drops only malformed rows."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from storage.columns import DepthColumns, GapColumns, SnapshotColumns, levels_ok, levels_to_arrow
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
    s.append(1, 2, 99, [["1", "2"]], [["3", "4"]], 1000, "BTCUSDT", None, None)
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
    """append_pairs (msgspec's typed pairs, flattened) and append (orjson's lists) may
    alternate; the table keeps arrival order and the exact values."""
    buf = DepthColumns("diff_orderbooks")
    buf.FLAT_LIMIT = 50  # force chunking inside the example too
    for i, (fast, bids, asks) in enumerate(rows):
        if fast:
            buf.append_pairs(i, i, "A", i, i, None, None, bids, asks)
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
    buf.append_pairs(1, None, "A", None, 10, None, None, [("1.5", "2")], [("2.5", "1")])
    buf.append_pairs(2, None, "A", None, 11, None, None, [("1.5", "x")], [])
    buf.append_pairs(3, None, "A", None, 12, None, None, [], [("2.5", "3")])
    table, dropped = buf.take()
    assert table.column("final_update_id").to_pylist() == [10, 12]
    assert table.column("ask_sizes").to_pylist() == [[1.0], [3.0]]
    assert [d[4] for d in dropped] == [11]


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
