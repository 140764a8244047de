"""The one owner of everything that runs while recording: every long-lived thread and
helper process is started, watched and stopped here, in one order.

    start:  writer ─► processor ─► relays ─► snapshots ─► readers ─► clock ─► listings ─► compactor ─► uploader
    stop:   the reverse: what feeds a thing stops before it

Stopping, stage by stage: `stop` is set (every producer's loop ends), then each stage's
stop action runs (the snapshot pool drains, the processor and writer get their STOP
sentinels), then its threads are joined with a timeout, and a thread that did not end is
logged. A thread added once the stop has begun (a listing that arrives during stop) is
refused, never started.

Watching (every half second, from the main thread): a thread that died before the stop is
fatal: its exception was logged at critical level (`service.threads`: a thread either
restarts itself or dies), and the collector stops with exit status 1 so that systemd
restarts it. A helper process that died is started again after a capped backoff
(logged, counted); until it is up, the readers it served read their own sockets.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from service.backoff import backoff_delay
from service.helpers import Helper

log = logging.getLogger("collector")

STAGES = ("writer", "processor", "relays", "snapshots", "readers", "clock", "listings", "compactor", "uploader")
JOIN_TIMEOUT = {"writer": 30.0, "processor": 20.0, "snapshots": 5.0, "readers": 5.0, "clock": 10.0,
                "listings": 10.0, "compactor": 30.0, "uploader": 30.0}


@dataclass
class _Stage:
    threads: list[threading.Thread] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class _HelperState:
    helper: Helper
    failures: int = 0          # failed starts in a row (the backoff)
    next_try: float = 0.0      # monotonic time of the next start attempt


class Supervisor:
    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.stages: dict[str, _Stage] = {s: _Stage() for s in STAGES}
        self.helpers: list[_HelperState] = []
        self.started = False
        self.stopping = False
        self._lock = threading.Lock()  # add() from the listings thread against stop() and threads()

    # ---- what runs -------------------------------------------------------------------------
    def add(self, stage: str, thread: threading.Thread, on_stop: Callable[[], None] | None = None) -> bool:
        """Own `thread` in `stage` (started now if the others run); False once stopping."""
        with self._lock:
            if self.stopping:
                log.info("not starting %s: the collector is stopping", thread.name)
                return False
            st = self.stages[stage]
            st.threads.append(thread)
            if on_stop is not None:
                st.on_stop.append(on_stop)
            if self.started:
                thread.start()
        return True

    def add_helper(self, helper: Helper) -> None:
        self.helpers.append(_HelperState(helper))

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return [t for s in STAGES for t in self.stages[s].threads]

    # ---- life ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            for name in STAGES:
                if name == "relays":
                    for h in self.helpers:
                        self._start_helper(h)
                for t in self.stages[name].threads:
                    t.start()
            self.started = True

    def watch(self) -> str | None:
        """One look: the names of threads that died before the stop (fatal), if any;
        helpers that died are started again when their backoff allows."""
        dead = [t.name for t in self.threads() if t.ident is not None and not t.is_alive()]
        if dead:
            return ", ".join(dead)
        now = time.monotonic()
        for h in self.helpers:
            if not h.helper.alive() and now >= h.next_try and not self.stop.is_set():
                log.error("%s is down (exit status %s); starting it again", h.helper.name, h.helper.exit_status())
                h.helper.restarts += 1
                self._start_helper(h)
        return None

    def _start_helper(self, h: _HelperState) -> None:
        if h.helper.start():
            h.failures = 0
        else:
            h.next_try = time.monotonic() + backoff_delay(h.failures, base=2.0, cap=60.0)
            h.failures += 1

    def shutdown(self) -> bool:
        """Stop everything in the reverse of the start order; False if some thread did not end."""
        self.stop.set()
        with self._lock:
            self.stopping = True
        clean = True
        for name in reversed(STAGES):
            if name == "relays":  # every reader has ended
                for h in self.helpers:
                    h.helper.close()
                continue
            stage = self.stages[name]
            for action in stage.on_stop:
                action()
            deadline = time.monotonic() + JOIN_TIMEOUT[name]
            for t in stage.threads:
                if t.ident is None:
                    continue
                t.join(max(0.1, deadline - time.monotonic()))
                if t.is_alive():
                    clean = False
                    log.error("thread did not stop in %.0fs: %s", JOIN_TIMEOUT[name], t.name)
        return clean

    def helpers_up(self) -> tuple[int, int]:
        """(helpers running, helpers configured)."""
        return sum(h.helper.alive() for h in self.helpers), len(self.helpers)

    def restarts(self) -> dict[str, int]:
        """Restarts so far, by thread or helper name (only those restarted)."""
        counts = {t.name: getattr(t, "restarts", 0) for t in self.threads()}  # a PipelineThread's; 0 for others
        out = {name: n for name, n in counts.items() if n}
        out.update({h.helper.name: h.helper.restarts for h in self.helpers if h.helper.restarts})
        return out
