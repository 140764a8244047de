"""The processor's per-frame loop (`FrameProcessor.on_frames`) writes out the field checks,
the continuing case of the continuity check and the first-copy case of partial-frame
deduplication, for speed. Here it must give exactly what the plain functions give
(`wire.depth_row`, `Continuity.check`, `PartialDedup.is_duplicate`, one frame at a time,
as the processor did before): the same rows, gap rows and counts, on random streams with
gaps, repeats, stale ids, two connections, malformed and unknown frames, in any split of
the frames into socket reads."""
from __future__ import annotations

import errno
import queue
import socket
import struct
import time

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import MarketConfig
from handlers.ingest.inbox import WS
from handlers.process import wire
from handlers.process.processor import DIFF, MAX_FRAME_BYTES, PARTIAL, FrameProcessor
from markets import MARKETS
from storage.columns import DepthColumns, decimal_text

SYMBOLS = ("BTCUSDT", "ETHUSDT")


class Reference(FrameProcessor):
    """The per-frame path as it was before it was written out (commit 6a00156); its
    `_accept` is the processor's own, which the general path still calls."""

    def on_frames(self, received_us, conn, frames):
        return [raw for raw in frames if self.on_frame(received_us, conn, raw)]

    def on_frame(self, received_us, conn, raw) -> bool:
        """False for a well-formed duplicate (not journaled)."""
        if len(raw) > MAX_FRAME_BYTES:
            self._malformed("oversized frame", raw)
            return True
        try:
            msg = wire.decode_frame(raw)
        except wire.DecodeError:
            self._on_other_frame(received_us, conn, raw)
            return True
        route = self.routes.get(msg.stream)
        if route is None:
            self._on_other_frame(received_us, conn, raw)
            return True
        kind, symbol = route
        row = wire.depth_row(msg.data, symbol, self._futures, kind == PARTIAL and not self._futures)
        if row is None:
            self._on_other_frame(received_us, conn, raw)
            return True
        self.stats.last_frame_us = received_us
        self.stats.frames[kind] += 1
        if not self._accept(kind, received_us, symbol, row, conn):
            return False
        self.bufs[kind].append_raw(received_us, *row)
        return True


def config(market: str) -> MarketConfig:
    return MarketConfig(market=MARKETS[market], symbols=SYMBOLS, ws_url="ws://x", rest_url="http://x",
                        diff_speed="100ms", partial_levels=20, partial_speed="100ms", snapshot_interval=60,
                        snapshot_limit=1000, symbols_per_connection=50)


LEVELS = [["1.5", "2"], ["1.4", "3"]]
DEFECTS = ("no_u", "no_levels", "wrong_symbol", "no_pu", "no_T", "no_E", "not_event", "not_json", "control")
# what an event is: (kind, symbol, id step, connection, defect)
events = st.lists(st.tuples(
    st.sampled_from(["diff", "diff", "diff", "partial", "partial", "other"]),
    st.sampled_from([*SYMBOLS, "XRPUSDT"]),
    st.sampled_from([1, 1, 1, 1, 0, 2, 5, -1, -3]),
    st.sampled_from([1, 1, 2]),
    st.sampled_from([None] * 10 + list(DEFECTS)),
), max_size=80)


def frames_of(market: str, evs) -> list[tuple[int, bytes]]:
    futures = market == "futures"
    last = {s: 1000 for s in (*SYMBOLS, "XRPUSDT")}
    out = []
    for kind, symbol, step, conn, defect in evs:
        # step 1 continues the stream, 0 repeats its last event, 2 and 5 skip ids (a gap),
        # a negative step goes back (stale)
        u = U = last[symbol] + step
        pu = u - 1
        last[symbol] = max(last[symbol], u)
        if kind == "other" or defect in ("not_json", "control"):
            raw = b'{"result":null,"id":1}' if defect == "control" else b'{"stream":'
            out.append((conn, raw))
            continue
        if kind == "diff" or futures:
            data = {"e": "depthUpdate", "E": 5, "s": symbol, "U": U, "u": u, "b": LEVELS, "a": LEVELS[:1]}
            if futures:
                data.update(T=4, pu=pu)
        else:
            data = {"lastUpdateId": u, "bids": LEVELS, "asks": LEVELS[:1]}
        if defect == "no_u":
            data.pop("u", None)
            data.pop("lastUpdateId", None)
        elif defect == "no_levels":
            data.pop("b", None)
            data.pop("bids", None)
        elif defect == "wrong_symbol" and "s" in data:
            data["s"] = "LTCUSDT"
        elif defect in ("no_pu", "no_T", "no_E"):
            data.pop(defect[3:], None)
        elif defect == "not_event" and "e" in data:
            data["e"] = "bookTicker"
        stream = f"{symbol.lower()}@depth@100ms" if kind == "diff" else f"{symbol.lower()}@depth20@100ms"
        out.append((conn, orjson.dumps({"stream": stream, "data": data})))
    return out


def run(cls, market: str, frames, cuts: list[int]):
    p = cls(config(market), None, queue.Queue(), flush_interval=30, now_us=time.time_ns)
    p.partial_dedup.memory, p.continuity.memory = 4, 8  # short memories: forgetting is tested too
    items, start = [], 0
    for i, end in enumerate([*sorted(set(cuts)), len(frames)]):
        # one socket read: one connection's frames, one stamp
        for conn in (1, 2):
            batch = [raw for c, raw in frames[start:end] if c == conn]
            if batch:
                items.append((WS, 1_000_000 + i, conn, batch))
        start = end
    journaled = []
    for _, received_us, conn, batch in items:  # as FrameProcessor.handle does, with what it journals
        p.continuity.saw(conn, received_us)
        journaled.append(p.on_frames(received_us, conn, batch))
    p.confirm_holes(all_now=True)
    p.build()
    tables = {}
    while not p.outbox.empty():
        kind, t = p.outbox.get_nowait()
        tables[kind] = t.to_pylist()
    s = p.stats
    counts = (dict(s.frames), s.duplicates, s.malformed, s.gaps, s.stale, s.reordered, s.control,
              dict(s.gaps_by_reason), s.last_frame_us)
    return (tables, counts, {k: (v.head, v.conn, v.n, v.head_us) for k, v in p.continuity.streams.items()},
            p.partial_dedup.seen, journaled)


@pytest.mark.parametrize("market", ["spot", "futures"])
@settings(max_examples=200, deadline=None)
@given(evs=events, cuts=st.lists(st.integers(0, 80), max_size=10))
def test_written_out_loop_matches_the_plain_functions(market, evs, cuts):
    frames = frames_of(market, evs)
    cuts = [c for c in cuts if c <= len(frames)]
    assert run(FrameProcessor, market, frames, cuts) == run(Reference, market, frames, cuts)


def test_the_random_streams_reach_every_case():
    """The strategy above does produce gaps, duplicates, stale and malformed frames."""
    evs = [("diff", "BTCUSDT", 1, 1, None), ("diff", "BTCUSDT", 1, 1, None), ("diff", "BTCUSDT", 0, 2, None),
           ("diff", "BTCUSDT", 5, 1, None), ("diff", "BTCUSDT", -3, 1, None), ("partial", "BTCUSDT", 0, 1, None),
           ("partial", "BTCUSDT", 0, 2, None), ("diff", "ETHUSDT", 1, 1, "no_levels"), ("other", "BTCUSDT", 1, 1, None)]
    for market in ("spot", "futures"):
        tables, counts, *_ = run(FrameProcessor, market, frames_of(market, evs), [3, 6])
        _, duplicates, malformed, gaps, stale, *_ = counts
        assert duplicates == 2 and malformed >= 2 and gaps >= 2 and stale == 1, counts
        assert len(tables[DIFF]) == 4 and len(tables[PARTIAL]) == 1
        assert tables == run(Reference, market, frames_of(market, evs), [3, 6])[0]


@pytest.mark.parametrize("market", ["spot", "futures"])
@pytest.mark.parametrize("kind", ["diff", "partial"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_every_defect_is_judged_as_the_plain_functions_judge_it(market, kind, defect):
    evs = [(kind, "BTCUSDT", 1, 1, None), (kind, "BTCUSDT", 1, 1, defect), (kind, "BTCUSDT", 1, 1, None)]
    frames = frames_of(market, evs)
    assert run(FrameProcessor, market, frames, [1]) == run(Reference, market, frames, [1])


@pytest.mark.parametrize("market", ["spot", "futures"])
def test_copies_from_another_connection_are_not_journaled(market):
    one = frames_of(market, [("diff", "BTCUSDT", 1, 1, None), ("partial", "BTCUSDT", 0, 1, None),
                             ("diff", "BTCUSDT", 1, 1, None)])
    twice = one + [(2, raw) for _, raw in one]  # the second connection delivers the same frames later
    tables, counts, _, _, journaled = run(FrameProcessor, market, twice, [3])
    assert len(tables[DIFF]) == 2 and len(tables[PARTIAL]) == 1
    assert counts[1] == 3  # three duplicates, left out of the journal: the second read journals nothing
    assert journaled == [[raw for _, raw in one], []]


# -- SBE levels: packed mantissas converted in bulk against their exact decimal text ------

_MANTISSA = st.one_of(st.integers(-(2 ** 53), 2 ** 53), st.integers(-(2 ** 63), 2 ** 63 - 1),
                      st.sampled_from([0, 1, -1, 2 ** 53, 2 ** 53 + 1, 10 ** 18, 123456789012345]))
_SIDE = st.lists(st.tuples(_MANTISSA, _MANTISSA), max_size=6)
_ROW = st.tuples(_SIDE, _SIDE, st.integers(-25, 25), st.integers(-25, 25))


def _packed(levels: list[tuple[int, int]]) -> bytes:
    return b"".join(p.to_bytes(8, "little", signed=True) + q.to_bytes(8, "little", signed=True) for p, q in levels)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(_ROW, min_size=1, max_size=12))
def test_packed_sbe_levels_convert_to_the_doubles_of_their_decimal_text(rows):
    """`DepthColumns.append_packed` (numpy, many rows at once, exact bounds checked, the
    text way beyond them) gives the table that the levels' exact decimal text gives
    through `append` (Arrow's string -> double cast), bit for bit."""
    fast, plain = DepthColumns(DIFF), DepthColumns(DIFF)
    for i, (bids, asks, pe, qe) in enumerate(rows):
        scalars = (1_700_000_000_000_000 + i, 1_700_000_000_000_000, "BTCUSDT", i, i, None, None)
        fast.append_packed(*scalars, _packed(bids), _packed(asks), pe, qe)
        plain.append(*scalars, [[decimal_text(p, pe), decimal_text(q, qe)] for p, q in bids],
                     [[decimal_text(p, pe), decimal_text(q, qe)] for p, q in asks])
    (got, got_dropped), (want, want_dropped) = fast.take(), plain.take()
    assert got_dropped == want_dropped == []
    assert got.equals(want)
    for name in ("bid_prices", "bid_sizes", "ask_prices", "ask_sizes"):  # bit for bit (equals() takes -0.0 == 0.0)
        a, b = got.column(name).combine_chunks().flatten(), want.column(name).combine_chunks().flatten()
        assert np.array_equal(a.to_numpy().view(np.int64), b.to_numpy().view(np.int64))


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(st.tuples(st.integers(-(2 ** 53), 2 ** 53), st.integers(0, 2 ** 53)), max_size=6),
                               st.integers(-22, 22)), min_size=1, max_size=12))
def test_within_the_exact_bounds_the_bulk_way_is_taken_and_exact(rows):
    from storage.columns import levels_to_arrow, packed_levels
    prices, sizes = (packed_levels([_packed(levels) for levels, _ in rows], [e for _, e in rows], column)
                     for column in (0, 1))  # would raise if the text way were needed
    want_p, want_s = levels_to_arrow([[[decimal_text(p, e), decimal_text(q, e)] for p, q in levels]
                                      for levels, e in rows])
    for got, want in ((prices, want_p), (sizes, want_s)):
        assert got.offsets.equals(want.offsets)
        assert np.array_equal(got.flatten().to_numpy().view(np.int64), want.flatten().to_numpy().view(np.int64))


# --- the stamp relay's compiled loop (handlers/ingest/stamp_relay.c) against its Python loop
# (handlers/ingest/relay_process.py). tests/test_relay.py runs every relay test against both;
# here both relay the same writes side by side, and their records are compared raw.

def _relayed_pair(relay):
    """A loopback TCP connection whose client end the relay reads: (server end, the pair's
    end the records come out of, the client socket the collector would keep)."""
    from handlers.ingest.timestamps import SO_TIMESTAMPNS

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    client.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    server, _ = listener.accept()
    listener.close()
    pipe = relay.adopt(client)
    assert pipe is not None
    pipe.settimeout(5)
    return server, pipe, client


def _records(pipe, until_end: bool, wait: float = 5.0):
    """The records that come out of `pipe` within `wait` s (until the end record when asked)."""
    from handlers.ingest.relay_process import RECORD

    buf, out = b"", []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not until_end and out:
            deadline = min(deadline, time.monotonic() + 0.05)  # what came together
        pipe.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            more = pipe.recv(1 << 20)
        except socket.timeout:
            break
        if not more:
            break
        buf += more
        while len(buf) >= RECORD.size:
            stamp, n = RECORD.unpack_from(buf)
            if len(buf) < RECORD.size + n:
                break
            out.append((stamp, buf[RECORD.size:RECORD.size + n]))
            buf = buf[RECORD.size + n:]
            if n == 0 and until_end:
                return out
    assert not buf, "a record cut short"
    return out


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_the_compiled_relay_forwards_what_the_python_relay_forwards(ending):
    import select

    from handlers.ingest.relay import StampRelay, compiled_loop
    from handlers.ingest.relay_process import EAGER_READS, FORWARD_BYTES

    assert compiled_loop() is not None, "the compiled loop is not built: scripts/build-relay.sh"
    relays = {loop: StampRelay(f"stamp-relay-{loop[0]}", forward_after=3600, loop=loop) for loop in ("compiled", "python")}
    ends = {}
    try:
        for r in relays.values():
            assert r.start()
        ends = {loop: _relayed_pair(r) for loop, r in relays.items()}
        got = {loop: [] for loop in relays}
        bounds = []  # (first µs a write could arrive, its bytes)

        def send(data: bytes) -> None:
            bounds.append((time.time_ns() // 1000, data))
            for server, _, _ in ends.values():
                server.sendall(data)

        # the first EAGER_READS reads (the handshakes) go on at once, each its own record
        for i in range(EAGER_READS):
            send(b"eager %d" % i)
            for loop, (_, pipe, _) in ends.items():
                records = _records(pipe, until_end=False)
                assert [data for _, data in records] == [b"eager %d" % i], loop
                got[loop] += records
        # later reads wait for the next moment (an hour away here) ...
        for i in range(3):
            send(b"held %d" % i)
            time.sleep(0.03)
        readable, _, _ = select.select([pipe for _, pipe, _ in ends.values()], [], [], 0.3)
        assert readable == []
        # ... or until FORWARD_BYTES of a connection wait, or it ends
        send(bytes(range(256)) * (3 * FORWARD_BYTES // 256))
        time.sleep(0.3)  # read by both relays before the end
        for server, _, _ in ends.values():
            if ending == "reset":
                server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            server.close()
        done_us = time.time_ns() // 1000
        for loop, (_, pipe, _) in ends.items():
            got[loop] += _records(pipe, until_end=True)
    finally:
        for _, pipe, client in ends.values():
            pipe.close()
            client.close()
        for r in relays.values():
            r.close()
    sent = b"".join(data for _, data in bounds)
    for loop, records in got.items():
        *data_records, (end_stamp, end_data) = records
        assert end_data == b"" and end_stamp == (0 if ending == "close" else -errno.ECONNRESET), loop
        assert b"".join(data for _, data in data_records) == sent, loop
        stamps = [stamp for stamp, _ in data_records]
        assert stamps == sorted(stamps) and bounds[0][0] <= stamps[0] and stamps[-1] <= done_us, loop
        # each record stamped at or after the write of its last byte began
        pos, ends_at = 0, []
        for began, data in bounds:
            pos += len(data)
            ends_at.append((pos, began))
        pos = 0
        for stamp, data in data_records:
            pos += len(data)
            began = next(b for end, b in ends_at if end >= pos)
            assert began <= stamp, (loop, pos, stamp, began)
    compiled, python = got["compiled"], got["python"]
    assert [data for _, data in compiled[:EAGER_READS]] == [data for _, data in python[:EAGER_READS]]


def test_the_compiled_relay_has_the_python_relays_constants():
    """One home for each rule: the C loop's constants are the Python loop's."""
    import re
    from pathlib import Path

    from handlers.ingest import relay_process

    source = Path(relay_process.__file__).with_name("stamp_relay.c").read_text()

    def value(expr: str) -> int:
        shift = re.fullmatch(r"\((\d+) << (\d+)\)", expr)
        return int(shift[1]) << int(shift[2]) if shift else int(expr)

    defines = {name: value(expr) for name, expr in re.findall(r"^#define ([A-Z_]+) (\(\d+ << \d+\)|\d+)", source, re.M)}
    for name in ("READ_SIZE", "HOLD_LIMIT", "FORWARD_BYTES", "EAGER_READS"):
        assert defines[name] == getattr(relay_process, name), name
    assert defines["RECORD_SIZE"] == relay_process.RECORD.size
