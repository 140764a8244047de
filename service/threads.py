"""The collector's threads: one base class that names them for the kernel and decides, per
thread, what happens when one dies of an unexpected exception.

Thread names are given to the kernel too, so that `top -H`, `ps -L` and
/proc/<pid>/task/*/comm show `ws-spot-0a` or `processor-futures` rather than fifteen
`python` threads (Python 3.11 names its threads only for itself).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from typing import Any

from service.backoff import backoff_delay

log = logging.getLogger(__name__)

_PR_SET_NAME = 15
_libc = None

# What a thread's unexpected exception does (each subclass says which, and why, beside it):
RESTART = "restart"  # logged, counted (`restarts`), and the thread's loop runs again after a backoff
FATAL = "fatal"      # logged at critical level; the supervisor stops the collector, exit 1 (systemd restarts it)
CRASH_LOOP = (5, 600.0)  # a restarted thread that crashes this often in this many seconds becomes fatal


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread's Python name (or `name`) to the kernel; Linux keeps 15
    bytes. A no-op where prctl is unavailable: names are a convenience, never a failure."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        text = (name or threading.current_thread().name).encode()[:15]
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class PipelineThread(threading.Thread):
    """A long-lived thread: its name given to the kernel, its body `loop()`, its stop signal
    `self.stop` (a shared `threading.Event`). An exception out of `loop()` is never silent:
    - `on_crash = RESTART`: an error line with the traceback, `restarts` counted, then
      `recover()` and `loop()` again after a capped backoff; crashing CRASH_LOOP times
      over turns it FATAL (a bug that fires every time is for systemd and a human);
    - `on_crash = FATAL`: a critical line, and the thread ends; the supervisor sees it dead
      and stops the collector with exit status 1, so that systemd restarts it."""

    on_crash = FATAL
    stop: threading.Event

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restarts = 0
        self.failed = False  # ended by an exception (FATAL, or a crash loop)

    def run(self) -> None:
        name_os_thread()
        crashes: list[float] = []
        while True:
            try:
                self.loop()
                return
            except Exception:
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < CRASH_LOOP[1]] + [now]
                if self.on_crash == FATAL or len(crashes) >= CRASH_LOOP[0] or self.stop.is_set():
                    self.failed = True
                    log.critical("thread %s crashed%s", self.name, "" if self.on_crash == FATAL else
                                 f" {len(crashes)} times in {CRASH_LOOP[1]:.0f}s", exc_info=True)
                    return
                self.restarts += 1
                delay = backoff_delay(len(crashes) - 1, base=1.0, cap=30.0)
                log.error("thread %s crashed; restarting it in %.1fs (restart %d)", self.name, delay, self.restarts,
                          exc_info=True)
                if self.stop.wait(delay):
                    return
                self.recover()

    def loop(self) -> None:
        raise NotImplementedError

    def recover(self) -> None:
        """Before `loop()` runs again after a crash: let go of what the crashed run held."""
