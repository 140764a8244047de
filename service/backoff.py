"""Capped, jittered exponential backoff for reconnects, as a small pure function."""
from __future__ import annotations

import random
from typing import Callable


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 60.0, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number `attempt` (0 = first retry): "full jitter" between
    half and all of min(cap, base * 2**attempt), so that many clients do not retry in step."""
    ceiling = min(cap, base * (2 ** min(attempt, 32)))
    return ceiling * (0.5 + 0.5 * rand())
