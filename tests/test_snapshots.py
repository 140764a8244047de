"""The REST weight budget, with an injected clock."""
from __future__ import annotations

import threading

from handlers.rest.snapshots import WeightBudget


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


class AdvancingStop(threading.Event):
    """A stop event whose wait() moves the fake clock instead of sleeping."""

    def __init__(self, clock: FakeClock):
        super().__init__()
        self.clock, self.waited = clock, 0.0

    def wait(self, timeout=None):
        self.clock.t += timeout
        self.waited += timeout
        return self.is_set()


def test_budget_never_passes_its_share_per_minute():
    clock = FakeClock(60 * 1000 + 1)
    stop = AdvancingStop(clock)
    budget = WeightBudget(limit_per_minute=6000, share=0.5, clock=clock)
    granted = []
    for _ in range(200):
        assert budget.acquire(50, stop)
        granted.append(int(clock.t // 60))
    per_minute = {m: granted.count(m) * 50 for m in set(granted)}
    assert max(per_minute.values()) <= 3000
    assert per_minute[1000] == 3000


def test_budget_follows_the_server_header_and_pauses_after_429():
    clock = FakeClock(120.0)
    stop = AdvancingStop(clock)
    budget = WeightBudget(limit_per_minute=2400, share=0.5, clock=clock)
    budget.observe("1190")  # other programs on this IP used most of it
    assert budget.acquire(10, stop) and stop.waited == 0
    assert budget.acquire(10, stop) and stop.waited > 0  # had to wait for the next minute
    budget.pause(90)
    t0 = clock.t
    assert budget.acquire(1, stop)
    assert clock.t >= t0 + 90
