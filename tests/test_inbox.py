"""The market inbox: bounded, first in first out, and a full inbox makes putters wait
(never drops)."""
from __future__ import annotations

import queue
import threading

import pytest

from handlers.inbox import Inbox


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
