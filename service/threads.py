"""Thread names the kernel sees, so that `top -H`, `ps -L` and /proc/<pid>/task/*/comm
show `ws-spot-0-c3` or `processor-futures` rather than fifteen `python` threads (Python
3.11 names its threads only for itself)."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

_PR_SET_NAME = 15
_libc = None


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
    """A thread of the pipeline: its name given to the kernel, its body `loop()`, and an
    exception that ends it logged at critical level with the thread's name, then
    re-raised (the main loop sees the thread dead and stops the collector, so that
    systemd restarts it): no thread dies silently."""

    def run(self) -> None:
        name_os_thread()
        try:
            self.loop()
        except Exception:
            log.critical("thread %s crashed", self.name, exc_info=True)
            raise

    def loop(self) -> None:
        raise NotImplementedError
