"""Periodic REST full-depth snapshots, spread evenly over the interval, on a weight budget.

    snapshot-<market> (scheduler thread) --submit--> rest-<market>_N (ThreadPoolExecutor)
                                                        | requests.Session.get(depth)
                                                        v
                                              market inbox (REST, received_us, ...)

Symbol i of N is first due at i * interval / N, then every `interval`. A symbol named
by `request(symbol)` (a gap, or a symbol's first diff) goes ahead of the schedule.
Symbols come and go while running (`add`, `remove`: listings and halts).

`snapshot_interval` is a target: when N snapshots of the configured limit's weight per
interval would pass the collector's share of the exchange's weight limit, the interval
is stretched to what fits (`effective_interval`), evenly for every symbol. For example,
1,500 spot symbols at limit 1000 (weight 50) against 6,000 a minute at share 0.5 (3,000)
is one snapshot per symbol every 1,500 * 50 / 3,000 = 25 minutes. Every request first takes its
weight from `WeightBudget`, which never lets the collector pass its share of the
exchange's REQUEST_WEIGHT per minute, follows `X-MBX-USED-WEIGHT-1M` (other programs on
the same IP count too), and pauses everything after a 429 or 418 until `Retry-After`.
"""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import requests

from config import MarketConfig
from handlers.ingest.inbox import REST, Inbox
from service.backoff import backoff_delay
from service.threads import RESTART, PipelineThread, name_os_thread

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (3.05, 6.0)


class WeightBudget:
    """Request weight per UTC minute, shared by every request of one market."""

    def __init__(self, limit_per_minute: int, share: float, clock: Callable[[], float] = time.time):
        self.cap = max(1, int(limit_per_minute * share))
        self.clock = clock
        self.lock = threading.Lock()
        self.minute = -1
        self.used = 0
        self.paused_until = 0.0

    def _roll(self, now: float) -> None:
        minute = int(now // 60)
        if minute != self.minute:
            self.minute, self.used = minute, 0

    def acquire(self, weight: int, stop: threading.Event) -> bool:
        """Wait until `weight` fits in this minute; False if stopped first."""
        while not stop.is_set():
            with self.lock:
                now = self.clock()
                self._roll(now)
                if now >= self.paused_until and self.used + weight <= self.cap:
                    self.used += weight
                    return True
                wait = max(self.paused_until - now, (self.minute + 1) * 60 - now if now >= self.paused_until else 0)
            stop.wait(min(max(wait, 0.05), 5.0))
        return False

    def observe(self, used_header: str | None) -> None:
        if used_header and used_header.isdigit():
            with self.lock:
                self._roll(self.clock())
                self.used = max(self.used, int(used_header))

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.paused_until = max(self.paused_until, self.clock() + seconds)


def effective_interval(symbols: int, weight: int, cap_per_minute: int, target: float) -> float:
    """Seconds between two scheduled snapshots of one symbol: `target`, or longer when
    `symbols` snapshots of `weight` each per `target` would pass `cap_per_minute`."""
    return max(target, symbols * weight * 60.0 / max(1, cap_per_minute))


@dataclass
class SnapshotStats:
    requested: int = 0
    ok: int = 0
    failed: int = 0
    rate_limited: int = 0
    last_ok_us: int = 0
    latency_sum: float = 0.0  # seconds, over `ok` snapshots
    interval: float = 0.0     # the effective interval now (seconds)



class Snapshotter(PipelineThread):
    # RESTART: without it no gap is ever answered with a snapshot again; its schedule is
    # rebuilt from `active`, and requests already queued (`urgent`) wait for it
    on_crash = RESTART

    def __init__(self, cfg: MarketConfig, out: Inbox, stop: threading.Event,
                 budget: WeightBudget, now_us: Callable[[], int],
                 session: requests.Session | None = None, workers: int = 4):
        super().__init__(name=f"snapshot-{cfg.name}", daemon=True)
        self.cfg, self.out, self.stop, self.budget, self.now_us = cfg, out, stop, budget, now_us
        self.session = session or requests.Session()
        self.url = cfg.rest_url + cfg.market.depth_path
        self.weight = cfg.market.depth_weight(cfg.snapshot_limit)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"rest-{cfg.name}",
                                       initializer=name_os_thread)
        self.urgent: queue.Queue = queue.Queue()
        self.in_flight: set[str] = set()
        self.again: set[str] = set()
        self.lock = threading.Lock()
        self.stats = SnapshotStats()
        self.active: set[str] = set(cfg.symbols)
        self.stats.interval = self._interval(len(self.active))
        if self.stats.interval > cfg.snapshot_interval:
            log.warning("snapshot interval stretched market=%s from %gs to %.0fs: %d symbols x weight %d (limit %d) "
                        "fit %d weight a minute (rest_weight_share of the exchange's limit); gap and listing "
                        "snapshots go first", cfg.name, cfg.snapshot_interval, self.stats.interval,
                        len(self.active), self.weight, cfg.snapshot_limit, budget.cap)

    def _interval(self, symbols: int) -> float:
        return effective_interval(symbols, self.weight, self.budget.cap, self.cfg.snapshot_interval)

    def add(self, symbol: str) -> None:
        """Schedule `symbol` too (a listing); its first snapshot comes with its first diff."""
        self.urgent.put(("add", symbol))

    def remove(self, symbol: str) -> None:
        """Stop scheduling `symbol` (it stopped trading)."""
        self.urgent.put(("remove", symbol))

    def request(self, symbol: str) -> None:
        """Fetch a snapshot of `symbol` ahead of the schedule (thread-safe)."""
        self.urgent.put(symbol)

    def loop(self) -> None:
        # `active` in the config's order, then the listings since (after a restart: what it is now)
        symbols = [s for s in self.cfg.symbols if s in self.active] + sorted(self.active - set(self.cfg.symbols))
        n, interval = len(symbols), self.stats.interval
        start = time.monotonic()
        due = [(start + i * interval / n, i, sym) for i, sym in enumerate(symbols)]
        heapq.heapify(due)
        seq = len(due)
        while not self.stop.is_set():
            at = due[0][0] if due else time.monotonic() + 1.0
            try:
                item = self.urgent.get(timeout=max(0.0, at - time.monotonic()))
            except queue.Empty:
                if not due:
                    continue
                at, i, sym = due[0]
                if sym not in self.active:
                    heapq.heappop(due)
                    continue
                heapq.heapreplace(due, (at + self.stats.interval, i, sym))
                item = sym
            if isinstance(item, tuple):
                change, sym = item
                self._change(change, sym)
                if change == "add":
                    seq += 1
                    heapq.heappush(due, (time.monotonic() + self.stats.interval, seq, sym))
            elif item is not None and item in self.active:
                self._submit(item)

    def _change(self, change: str, symbol: str) -> None:
        (self.active.add if change == "add" else self.active.discard)(symbol)
        interval = self._interval(len(self.active))
        if interval != self.stats.interval:
            log.info("snapshot interval market=%s now %.0fs (%d symbols, target %gs)",
                     self.cfg.name, interval, len(self.active), self.cfg.snapshot_interval)
            self.stats.interval = interval

    def _submit(self, symbol: str) -> None:
        with self.lock:
            if symbol in self.in_flight:
                # A snapshot sent before a gap may predate it: fetch again once it is back.
                self.again.add(symbol)
                return
            self.in_flight.add(symbol)
        if not self.budget.acquire(self.weight, self.stop):
            with self.lock:
                self.in_flight.discard(symbol)
            return
        self.stats.requested += 1
        self.pool.submit(self._fetch, symbol)

    def _fetch(self, symbol: str, attempt: int = 0) -> None:
        try:
            retry = self._fetch_once(symbol)
        except Exception:  # a bug in one task: logged with its traceback, and the snapshot retried, never dropped
            log.error("snapshot task crashed market=%s symbol=%s", self.cfg.name, symbol, exc_info=True)
            retry = True
        finally:
            with self.lock:
                self.in_flight.discard(symbol)
                again = symbol in self.again
                self.again.discard(symbol)
        if again and not retry:
            self.request(symbol)
        if retry and not self.stop.is_set():
            # A failed snapshot is never dropped: it goes back to the front of the line
            # after a backoff (the budget decides when it may actually run).
            self.stop.wait(backoff_delay(attempt, base=1.0, cap=30.0))
            self.request(symbol)

    def _fetch_once(self, symbol: str) -> bool:
        """One request; True when it must be retried."""
        params: dict[str, str | int] = {"symbol": symbol, "limit": self.cfg.snapshot_limit}
        request_us = self.now_us()
        try:
            resp = self.session.get(self.url, params=params, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as e:
            self.stats.failed += 1
            log.warning("snapshot failed market=%s symbol=%s error=%s", self.cfg.name, symbol, type(e).__name__)
            return True
        received_us = self.now_us()
        self.budget.observe(resp.headers.get("X-MBX-USED-WEIGHT-1M"))
        if resp.status_code == 200:
            self.out.put((REST, received_us, (symbol, self.cfg.snapshot_limit, request_us, resp.content)))
            self.stats.ok += 1
            self.stats.last_ok_us = received_us
            self.stats.latency_sum += (received_us - request_us) / 1e6
            return False
        self.stats.failed += 1
        if resp.status_code in (418, 429):
            self.stats.rate_limited += 1
            # No Retry-After (futures does not promise one): wait for the next weight window.
            wait = _retry_after(resp.headers.get("Retry-After"), default=61.0 - time.time() % 60)
            self.budget.pause(wait)
            log.error("rate limited market=%s status=%d: pausing all snapshots for %.0fs",
                      self.cfg.name, resp.status_code, wait)
        else:
            log.warning("snapshot failed market=%s symbol=%s status=%d body=%r",
                        self.cfg.name, symbol, resp.status_code, resp.content[:200])
        return True

    def shutdown(self) -> None:
        self.urgent.put(None)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(1.0, float(value)) if value is not None else default
    except ValueError:
        return default
