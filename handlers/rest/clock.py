"""How far the local stamps can be trusted: once a minute per market, the kernel's view of
its clock (adjtimex: synchronised or not, maximum and estimated error) and the exchange's
time from a light REST call (`/api/v3/time`, `/fapi/v1/time`, `/dapi/v1/time`: weight 1,
taken from the market's REST budget), with its round trip and the offset of the local
clock at the request's midpoint. One `clock` row per sample, in the market's tree.

A clock the kernel does not call synchronised, or an offset beyond `clock_max_offset_ms`
(after allowing half the round trip, the offset's own uncertainty), is a warning in the
log when it starts and every 10 minutes while it lasts, and is in the metrics
(`obc_clock_offset_seconds`, `obc_clock_synced`), `verify` and `report`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import requests

from config import MarketConfig
from handlers.ingest.inbox import CLOCK, Inbox
from handlers.rest.snapshots import WeightBudget
from service.threads import RESTART, PipelineThread

log = logging.getLogger(__name__)

_STA_UNSYNC, _TIME_ERROR = 0x0040, 5
WARN_EVERY_S = 600.0


class _Timex(ctypes.Structure):
    """glibc's struct timex (sys/timex.h); ctypes lays out the padding."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("_reserved", ctypes.c_int * 11)]


def kernel_clock() -> tuple[bool | None, int | None, int | None]:
    """(synchronised, maximum error µs, estimated error µs) as the kernel sees its clock (a
    read-only adjtimex, modes 0); Nones where the call is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None, None, None
    if state < 0:
        return None, None, None
    return (state != _TIME_ERROR and not tx.status & _STA_UNSYNC), int(tx.maxerror), int(tx.esterror)


@dataclass
class ClockStats:
    samples: int = 0
    failures: int = 0
    synced: bool | None = None
    offset_us: int | None = None
    rtt_us: int | None = None
    max_error_us: int | None = None


class ClockSampler(PipelineThread):
    # RESTART: a sample holds nothing; a crash costs a minute's row at most
    on_crash = RESTART

    def __init__(self, cfg: MarketConfig, out: Inbox, stop: threading.Event, budget: WeightBudget,
                 now_us: Callable[[], int], session: requests.Session, every_s: float = 60.0,
                 max_offset_ms: float = 100.0):
        super().__init__(name=f"clock-{cfg.name}", daemon=True)
        self.cfg, self.out, self.stop, self.budget, self.now_us = cfg, out, stop, budget, now_us
        self.session, self.every_s, self.max_offset_us = session, every_s, max_offset_ms * 1000
        self.url = cfg.rest_url + cfg.market.time_path
        self.stats = ClockStats()
        self._bad_since: float | None = None
        self._warned = -1e18

    def loop(self) -> None:
        while True:
            self.sample()
            if self.stop.wait(self.every_s):
                return

    def sample(self) -> dict | None:
        """One row: the kernel's view, then the exchange's time (None fields if it failed)."""
        synced, max_error, est_error = kernel_clock()
        row: dict = {"sample_time": self.now_us(), "synced": synced, "max_error_us": max_error,
                     "est_error_us": est_error, "exchange_time": None, "rtt_us": None, "offset_us": None}
        if self.budget.acquire(1, self.stop):
            sent = self.now_us()
            try:
                resp = self.session.get(self.url, timeout=(3.05, 5.0))
                got = self.now_us()
                self.budget.observe(resp.headers.get("X-MBX-USED-WEIGHT-1M"))
                server_ms = int(resp.json()["serverTime"]) if resp.status_code == 200 else None
            except (requests.RequestException, ValueError, KeyError, TypeError):
                server_ms = None
            if server_ms is not None:
                row.update(exchange_time=server_ms * 1000, rtt_us=got - sent, offset_us=(sent + got) // 2 - server_ms * 1000)
            else:
                self.stats.failures += 1
        self.stats.samples += 1
        self.stats.synced, self.stats.offset_us = synced, row["offset_us"]
        self.stats.rtt_us, self.stats.max_error_us = row["rtt_us"], max_error
        self.out.put((CLOCK, row["sample_time"], row))
        self._judge(row)
        return row

    def _judge(self, row: dict) -> None:
        offset, rtt = row["offset_us"], row["rtt_us"] or 0
        beyond = offset is not None and abs(offset) - rtt / 2 > self.max_offset_us
        bad = row["synced"] is False or beyond
        now = time.monotonic()
        if not bad:
            if self._bad_since is not None:
                log.info("clock back within bounds market=%s offset_ms=%.1f synced=%s", self.cfg.name,
                         (offset or 0) / 1000, row["synced"])
            self._bad_since = None
            return
        if self._bad_since is None:
            self._bad_since = now
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            why = []
            if row["synced"] is False:
                why.append(f"the kernel says the clock is not synchronised (max error {row['max_error_us'] / 1e3:.0f} ms)")
            if beyond:
                why.append(f"the local clock is {offset / 1e3:+.1f} ms off the exchange's (round trip "
                           f"{rtt / 1e3:.1f} ms; bound clock_max_offset_ms = {self.max_offset_us / 1e3:g})")
            log.warning("clock market=%s: %s: received_time stamps may be off by as much", self.cfg.name,
                        "; ".join(why))
