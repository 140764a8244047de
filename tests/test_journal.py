"""The write-ahead journal reads back exactly the items the processor took in: single
frames, the frames of one socket read (one record, one stamp), and snapshot bodies; a
segment cut short gives back its complete records in order, never a made-up one."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.journal import REST_RECORD as REST
from storage.journal import WS_RECORD as WS
from storage.journal import Journal, read_segment

frame = st.binary(min_size=0, max_size=300)
ws_item = st.tuples(st.just(WS), st.integers(0, 1 << 62), st.integers(0, 1 << 31), st.lists(frame, min_size=1, max_size=8))
rest_item = st.tuples(st.just(REST), st.integers(0, 1 << 62), st.tuples(
    st.sampled_from(["BTCUSDT", "ETHUSDT"]), st.sampled_from([5, 1000]), st.integers(0, 1 << 62), frame))


def write(folder, items, sync_every_items: int = 0) -> str:
    j = Journal(folder, run_id=7)
    for i, item in enumerate(items):
        if sync_every_items and i % sync_every_items == 0:
            j.sync(force=True)  # a zstd block, as the processor pushes one every 0.2 s
        if item[0] == WS:
            j.add_ws(*item[1:])
        else:
            j.add_rest(item[1], *item[2])
    name = j.close_segment()
    j.close()
    return name


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(ws_item, rest_item), max_size=30))
def test_items_read_back_exactly(tmp_path_factory, items):
    folder = tmp_path_factory.mktemp("j")
    name = write(folder, items)
    got, complete = read_segment(folder / f"seg-{name}.zst")
    assert complete
    assert got == items


def test_a_segment_cut_short_keeps_its_complete_records(tmp_path):
    items = [(WS, 10 + i, 1, [b'{"n":%d}' % i] * (1 + i % 3)) for i in range(2000)]
    name = write(tmp_path, items, sync_every_items=100)
    path = tmp_path / f"seg-{name}.zst"
    data = path.read_bytes()
    kept = []
    for cut in (len(data) // 3, len(data) - 5):
        path.write_bytes(data[:cut])
        got, complete = read_segment(path)
        assert not complete
        assert got == items[:len(got)]
        kept.append(len(got))
    assert 0 < kept[0] < kept[1] < len(items)  # every block before the cut comes back
    path.write_bytes(data)
    assert read_segment(path) == (items, True)
