"""The reader's fast path (ReadAhead.data_frames) against websocket-client's own frame
parser: the same byte stream, cut into reads at random places, must give the same
frames in the same order, whatever mix of data, control, fragmented, large or masked
frames it holds; and every frame one call returns was completed by the latest socket read
(the frames of one item share that read's kernel stamp)."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websocket._abnf import ABNF, frame_buffer

from handlers.ingest.websocket import ReadAhead

OPCODES = [ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY, ABNF.OPCODE_PING, ABNF.OPCODE_PONG]
frame_specs = st.lists(st.tuples(
    st.sampled_from(OPCODES),
    st.sampled_from([0, 1, 5, 125, 126, 127, 300, 65535, 65536, 70000]),  # around each length form
    st.booleans(),                     # fragmented into two frames (data only)
    st.booleans(),                     # masked (a server must not; the library's path)
), min_size=1, max_size=12)


def encode(specs, seed) -> tuple[bytes, int]:
    rng = random.Random(seed)
    out = []
    for opcode, n, fragmented, masked in specs:
        if opcode in (ABNF.OPCODE_PING, ABNF.OPCODE_PONG):
            n, fragmented = min(n, 125), False
        payload = bytes(rng.getrandbits(8) for _ in range(min(n, 64))) * (n // 64 + 1)
        payload = payload[:n]
        parts = [payload[:n // 2], payload[n // 2:]] if fragmented else [payload]
        for i, part in enumerate(parts):
            frame = ABNF(fin=int(i == len(parts) - 1), opcode=opcode if i == 0 else ABNF.OPCODE_CONT,
                         mask_value=int(masked), data=part)
            if masked:
                frame.get_mask_key = lambda n: b"\x01\x02\x03\x04"
            out.append(frame.format())
    return b"".join(out), len(specs)


def chunked(data: bytes, seed: int):
    rng = random.Random(seed)
    pos = 0

    def raw_recv(n: int) -> bytes:
        nonlocal pos
        k = min(n, rng.choice([1, 2, 3, 7, 100, 1000, 20000]))
        piece = data[pos:pos + k]
        pos += len(piece)
        if not piece:
            raise EOFError
        return piece
    return raw_recv


def library_only(data: bytes, seed: int) -> list[tuple[int, bytes]]:
    fb = frame_buffer(chunked(data, seed), skip_utf8_validation=True)
    return read_all(lambda: None, fb)


def with_fast_path(data: bytes, seed: int) -> list[tuple[int, bytes]]:
    raw_recv = chunked(data, seed)
    total = [0, 0]  # bytes read before the latest read, bytes read in all

    def counting(n: int) -> bytes:
        piece = raw_recv(n)
        total[:] = [total[1], total[1] + len(piece)]
        return piece

    ahead = ReadAhead(counting, size=4096)
    fb = frame_buffer(ahead.recv, skip_utf8_validation=True)

    def fast():
        start = total[1] - (len(ahead.buf) - ahead.pos)  # stream offset of the buffer's head
        frames = ahead.data_frames()
        if frames:
            first = len(frames[0])
            first_end = start + (2 if first < 126 else 4) + first
            # the first frame (so all of them) was completed by the latest read
            assert total[0] < first_end <= total[1], (total, first_end)
        return frames
    return read_all(fast, fb)


def read_all(fast, fb) -> list[tuple[int, bytes]]:
    frames = []
    while True:
        try:
            payloads = fast()
            if payloads is not None:
                assert payloads, "an empty batch"
                frames.extend(("data", p) for p in payloads)
                continue
            f = fb.recv_frame()
        except EOFError:
            return frames
        kind = "data" if f.opcode in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY) and f.fin else f.opcode
        frames.append((kind, f.data if isinstance(f.data, bytes) else f.data.encode()))


@settings(max_examples=150, deadline=None)
@given(frame_specs, st.integers(0, 1000))
def test_fast_path_reads_exactly_what_the_library_reads(specs, seed):
    data, _ = encode(specs, seed)
    assert with_fast_path(data, seed) == library_only(data, seed)


@pytest.mark.parametrize("first", [0x81, 0x82])
def test_fast_path_takes_whole_small_frames_and_leaves_the_rest(first):
    """Data frames come from the buffer, completed by further reads when cut; a control
    frame is left at the head for the library."""
    reads = [b"", b"z", b""]
    ahead = ReadAhead(lambda n: reads.pop(0), size=16)
    ahead.buf = bytes([first, 3]) + b"abc" + bytes([first, 1]) + b"d" + bytes([0x89, 0]) + bytes([first, 5]) + b"xy"
    assert ahead.data_frames() == [b"abc", b"d"]   # every whole data frame before the ping
    assert ahead.data_frames() is None             # a ping: the library's
    assert ahead.recv(2) == bytes([0x89, 0])
    assert ahead.data_frames() is None             # incomplete, and the peer closed: the library reports it
    assert ahead.pos == 10 and reads == [b"z", b""]
    assert ahead.data_frames() is None             # "z" completes nothing; the peer closed again
    assert (ahead.buf, ahead.pos) == (bytes([first, 5]) + b"xyz", 0)
    ahead.raw_recv = lambda n: b"uv" + bytes([first, 0])
    assert ahead.data_frames() == [b"xyzuv", b""]  # both completed by the next read
    assert ahead.pos == len(ahead.buf)
