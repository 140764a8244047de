"""The market inbox: bounded, first in first out, and a full inbox makes putters wait
(never drops)."""
from __future__ import annotations

import queue
import threading

import pytest

from handlers.ingest.inbox import Inbox


def test_bound_order_and_empty():
    box = Inbox(maxsize=3)
    for i in range(3):
        box.put_nowait(i)
    assert box.qsize() == 3
    with pytest.raises(queue.Full):
        box.put_nowait(3)
    assert [box.get_nowait() for _ in range(3)] == [0, 1, 2]
    assert box.empty()
    with pytest.raises(queue.Empty):
        box.get_nowait()


def test_a_full_inbox_makes_the_putter_wait_and_loses_nothing():
    box = Inbox(maxsize=10)
    n = 2_000

    def produce():
        for i in range(n):
            try:
                box.put_nowait(i)
            except queue.Full:
                box.put(i)

    producer = threading.Thread(target=produce)
    producer.start()
    got, most = [], 0
    while len(got) < n:
        most = max(most, box.qsize())
        got.append(box.get(timeout=10))
    producer.join(timeout=10)
    assert got == list(range(n))
    assert most <= 10 + 1  # one putter: at most one item past the bound
    assert box.empty()


def test_unbounded_when_maxsize_is_zero():
    box = Inbox()
    for i in range(10_000):
        box.put_nowait(i)
    assert box.qsize() == 10_000


def test_the_bound_counts_frames_not_items():
    """A reader's item holds every frame of one socket read: the bound and qsize() are
    in frames."""
    box = Inbox(maxsize=10)
    box.put_nowait("a", 6)
    assert box.qsize() == 6
    box.put_nowait("b", 6)  # 6 < 10 when it was checked: one item may pass the bound
    assert box.qsize() == 12
    with pytest.raises(queue.Full):
        box.put_nowait("c", 1)
    assert box.get_nowait() == "a" and box.qsize() == 6
    box.put_nowait("c", 1)
    assert [box.get_nowait(), box.get(timeout=1)] == ["b", "c"]
    assert box.qsize() == 0 and box.empty()


def test_frame_count_stays_exact_with_many_putters():
    box = Inbox(maxsize=50)
    per_thread, threads = 3_000, 4

    def produce(t):
        for i in range(per_thread):
            item = (t, i)
            try:
                box.put_nowait(item, 1 + i % 7)
            except queue.Full:
                box.put(item, 1 + i % 7)

    producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for p in producers:
        p.start()
    got, most = [], 0
    while len(got) < per_thread * threads:
        most = max(most, box.qsize())
        got.append(box.get(timeout=10))
    for p in producers:
        p.join(timeout=10)
    for t in range(threads):  # each putter's items in its order
        assert [i for u, i in got if u == t] == list(range(per_thread))
    assert most <= 50 + threads * 7  # past the bound by at most one item per putter
    assert box.qsize() == 0 and box.empty()
