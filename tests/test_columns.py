"""Levels -> Arrow in bulk, and the row-by-row fallback that drops only malformed rows."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from storage.columns import DepthColumns, GapColumns, SnapshotColumns, levels_to_arrow
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
