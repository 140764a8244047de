"""When the processor hands rows to the writer: every BUILD_ROWS depth rows or
BUILD_SNAPSHOTS snapshots, without waiting for `build_interval` (memory stays bounded
at any rate), and everything at the segment's end."""
from __future__ import annotations

import json
import queue
import time

import orjson

from config import MarketConfig
from handlers.ingest.inbox import REST, WS
from handlers.process.processor import BUILD_ROWS, BUILD_SNAPSHOTS, DIFF, STOP, FrameProcessor
from markets import MARKETS
from tests.helpers import wait_until

SYMBOLS = ("BTCUSDT", "ETHUSDT")


def processor() -> tuple[FrameProcessor, queue.Queue, queue.Queue]:
    cfg = MarketConfig(market=MARKETS["spot"], symbols=SYMBOLS, ws_url="ws://x", rest_url="http://x",
                       diff_speed="100ms", partial_levels=20, partial_speed="100ms", snapshot_interval=60,
                       snapshot_limit=1000, symbols_per_connection=50)
    inbox, outbox = queue.Queue(), queue.Queue()
    p = FrameProcessor(cfg, inbox, outbox, flush_interval=3600, now_us=time.time_ns, build_interval=3600)
    p.start()
    return p, inbox, outbox


def diff(symbol: str, u: int) -> bytes:
    data = {"e": "depthUpdate", "E": 1, "s": symbol, "U": u, "u": u, "b": [["1.5", "2"]], "a": []}
    return orjson.dumps({"stream": f"{symbol.lower()}@depth@100ms", "data": data})


def taken(outbox: queue.Queue) -> list[tuple[str, int]]:
    out = []
    while not outbox.empty():
        kind, table = outbox.get_nowait()
        out.append((kind, table.num_rows))
    return out


def test_rows_are_handed_over_every_build_rows_not_only_every_build_interval():
    p, inbox, outbox = processor()
    for u in range(1, BUILD_ROWS):
        inbox.put((WS, 1_000 + u, 1, [diff("BTCUSDT", u)]))
    wait_until(inbox.empty)
    time.sleep(0.5)  # the processor's turn with the last of them is over
    assert taken(outbox) == []  # fewer than BUILD_ROWS: nothing handed over yet
    inbox.put((WS, 1_000 + BUILD_ROWS, 1, [diff("BTCUSDT", BUILD_ROWS)]))
    wait_until(lambda: not outbox.empty(), timeout=10)
    got = taken(outbox)
    assert (DIFF, BUILD_ROWS) in got
    inbox.put(STOP)
    p.join(10)
    assert not p.is_alive()


def test_snapshots_are_handed_over_every_build_snapshots():
    p, inbox, outbox = processor()
    body = orjson.dumps({"lastUpdateId": 7, "bids": [["1.5", "2"]] * 1000, "asks": [["1.6", "3"]] * 1000})
    for i in range(BUILD_SNAPSHOTS):
        inbox.put((REST, 2_000 + i, (SYMBOLS[i % 2], 1000, 1_000 + i, body)))
    wait_until(lambda: not outbox.empty(), timeout=10)
    assert taken(outbox) == [("orderbooks", BUILD_SNAPSHOTS)]
    inbox.put(STOP)
    p.join(10)
    # at the end: the segment is closed, and the writer told to stop
    assert [outbox.get_nowait() for _ in range(outbox.qsize())][-1] is STOP


def snapshot_table(market: str, bodies: list[bytes]):
    """The orderbooks rows `on_snapshot` makes of `bodies` (no thread), and the symbols
    whose snapshot it asked for again."""
    cfg = MarketConfig(market=MARKETS[market], symbols=SYMBOLS, ws_url="ws://x", rest_url="http://x",
                       diff_speed="100ms", partial_levels=20, partial_speed="100ms", snapshot_interval=60,
                       snapshot_limit=1000, symbols_per_connection=50)
    again: list[str] = []
    p = FrameProcessor(cfg, None, queue.Queue(), flush_interval=3600, now_us=time.time_ns,
                       request_snapshot=again.append)
    for i, body in enumerate(bodies):
        p.on_snapshot(2_000 + i, "BTCUSDT", 1000, 1_000 + i, body)
    return p.snapshots.take(), again, p.stats.malformed


def test_snapshots_fast_and_general_paths_give_the_same_rows():
    """A compact body goes the fast way (msgspec, bulk level check); the same JSON with
    spaces, which the bulk check refuses, goes the general way: same rows either way."""
    for market, extra in (("spot", {}), ("futures", {"E": 1_700_000_000_123, "T": 1_700_000_000_120})):
        snap = {"lastUpdateId": 160, "bids": [["0.0024", "10"], ["0.0023", "1e3"]], "asks": [["0.0026", "100"]], **extra}
        compact = orjson.dumps(snap)
        spaced = json.dumps(snap, indent=1).encode()
        fast, again_fast, bad_fast = snapshot_table(market, [compact])
        slow, again_slow, bad_slow = snapshot_table(market, [spaced])
        assert again_fast == again_slow == [] and bad_fast == bad_slow == 0
        assert fast.equals(slow)
        row = fast.to_pylist()[0]
        assert row["bid_prices"] == [0.0024, 0.0023] and row["bid_sizes"] == [10.0, 1000.0]
        E = extra.get("E")  # stored in µs: the futures ms x 1000
        assert row["event_time"] == (E * 1000 if E else None) and row["lastUpdateId"] == 160


def test_malformed_snapshots_are_counted_and_fetched_again():
    good = {"lastUpdateId": 1, "bids": [["1", "2"]], "asks": []}
    bad = [
        b"not json", b"[]", orjson.dumps({**good, "lastUpdateId": 1.5}),
        orjson.dumps({**good, "bids": ["12"]}),           # a string where a pair should be
        orjson.dumps({**good, "bids": [["1_000", "2"]]}),  # float() reads it, Arrow does not
        orjson.dumps({**good, "bids": [["1", "2", "3"]]}),
        orjson.dumps({**good, "asks": None}),
        orjson.dumps({k: v for k, v in good.items() if k != "bids"}),
    ]
    table, again, malformed = snapshot_table("spot", bad + [orjson.dumps(good)])
    assert table.num_rows == 1 and again == ["BTCUSDT"] * len(bad) and malformed == len(bad)
    # futures snapshots must carry E and T
    table, again, malformed = snapshot_table("futures", [orjson.dumps(good)])
    assert table.num_rows == 0 and again == ["BTCUSDT"] and malformed == 1


def test_a_batch_is_taken_in_arrival_order_across_connections():
    from handlers.process.processor import in_arrival_order
    a1, a2 = (WS, 100, 1, [b"a1"]), (WS, 90, 1, [b"a2"])  # the host clock stepped back: order kept
    b1, b2 = (WS, 95, 2, [b"b1"]), (WS, 120, 2, [b"b2"])
    rest = (REST, 97, ("BTCUSDT", 1000, 96, b"{}"))
    assert in_arrival_order([a1, a2]) == [a1, a2]  # one connection: as queued
    merged = in_arrival_order([a1, a2, b1, rest, b2, STOP])
    assert merged == [b1, rest, a1, a2, b2, STOP]
    assert merged.index(a1) < merged.index(a2)


def test_the_copy_kept_is_the_one_stamped_first():
    """Two connections deliver the same diff; the reader that stamped it later queued it
    first. The row carries the earlier stamp."""
    p, inbox, outbox = processor()
    diff = {"stream": "btcusdt@depth@100ms",
            "data": {"e": "depthUpdate", "E": 1, "s": "BTCUSDT", "U": 1, "u": 5, "b": [["1.0", "2"]], "a": [["2.0", "1"]]}}
    frame = orjson.dumps(diff)
    inbox.put((WS, 2_000, 1, [frame]))
    inbox.put((WS, 1_000, 2, [frame]))  # arrived first, queued second
    inbox.put(STOP)
    p.join(10)
    tables = {}
    while not outbox.empty():
        item = outbox.get_nowait()
        if item is not STOP and item[0] == DIFF:
            tables[DIFF] = item[1]
    assert tables[DIFF].column("received_time").to_pylist() == [1_000]


class _ArrivesDuringTheWait:
    """The processor's idle wait, with items arriving while it waits (deterministic: they
    are put by the wait itself)."""

    def __init__(self, inbox: queue.Queue, items: list):
        self.inbox, self.items, self.waits = inbox, items, 0

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        for item in self.items:
            self.inbox.put(item)
        self.items = []
        return False


def test_what_arrives_during_the_wait_is_taken_in_the_same_turn():
    cfg = MarketConfig(market=MARKETS["spot"], symbols=SYMBOLS, ws_url="ws://x", rest_url="http://x",
                       diff_speed="100ms", partial_levels=20, partial_speed="100ms", snapshot_interval=60,
                       snapshot_limit=1000, symbols_per_connection=50)
    inbox: queue.Queue = queue.Queue()
    p = FrameProcessor(cfg, inbox, queue.Queue(), flush_interval=3600, now_us=time.time_ns)
    items = [(WS, 1_000, 1, [diff("BTCUSDT", 1)]), (WS, 1_001, 2, [diff("BTCUSDT", 1)])]
    p._idle = _ArrivesDuringTheWait(inbox, list(items))  # type: ignore[assignment]
    assert p._take_batch(1.0) == items  # one turn of the loop, not an empty one and then another
    assert p._idle.waits == 1
    inbox.put((WS, 1_002, 1, [diff("BTCUSDT", 2)]))
    assert len(p._take_batch(1.0)) == 1 and p._idle.waits == 1  # items waiting: no wait at all
    assert p._take_batch(1.0) == [] and p._idle.waits == 2  # nothing came: one wait, then empty
