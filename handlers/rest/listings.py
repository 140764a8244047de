"""Following the market while running: every `listing_check` seconds, exchangeInfo says
which symbols trade; the market's symbol set follows it without a restart.

    listings-<market> --exchangeInfo (every listing_check s; ticker/24hr when ranking)--> exchange
          |  on_change(added, removed)
          v
    pipeline: processor routes, snapshot schedule, SUBSCRIBE / UNSUBSCRIBE (or a new batch)

What changes the set, by `symbols`:
- a list: a listed symbol that trades again is recorded again; one that stops is dropped;
- `all`: any symbol that starts trading and passes `quote_assets` / `symbols_exclude` is
  added; any that stops trading is dropped;
- `top N`: ranked by 24h quote volume at start and re-ranked once a UTC day (the first
  check after midnight): entrants are added, leavers dropped (reason `unranked`). Between
  rankings a new listing is added at once if it ranks within the top N, and nothing is
  dropped unless it stops trading, so a symbol does not come and go with the volumes.
A symbol that stops trading (HALT, BREAK, CANCEL_ONLY, ...) is dropped with reason
`halted`, one gone from exchangeInfo with `delisted`: logged at info level, never an
error. Each check's weight (exchangeInfo; ticker/24hr when ranking) is taken from the
market's REST budget. A failed check is logged and tried again at the next one.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import requests

from config import MarketConfig
from handlers.process import continuity as cont
from handlers.rest.exchange import ExchangeUnavailable, candidates, fetch_exchange_info, fetch_volumes, mine, rank, statuses
from handlers.rest.snapshots import WeightBudget
from service.threads import RESTART, PipelineThread

log = logging.getLogger(__name__)

Removed = list[tuple[str, str]]  # (symbol, reason)


def utc_day(t: float) -> int:
    return int(t // 86400)


class ListingWatcher(PipelineThread):
    # RESTART: its reference (`trading`, the ranking day) is kept on the object; a crash
    # delays the next look by a backoff, and the set already recorded goes on
    on_crash = RESTART

    def __init__(self, cfg: MarketConfig, recorded: Callable[[], list[str]], trading: set[str], session: requests.Session,
                 budget: WeightBudget, stop: threading.Event,
                 on_change: Callable[[list[str], Removed], None], clock: Callable[[], float] = time.time):
        super().__init__(name=f"listings-{cfg.name}", daemon=True)
        self.cfg, self.session, self.budget, self.stop, self.on_change = cfg, session, budget, stop, on_change
        self.clock = clock
        self.recorded = recorded  # the symbols recorded now (the pipeline's, which on_change changes)
        self.trading = set(trading)  # what traded at the last look (a new listing is one that did not)
        self.ranked_day = utc_day(clock())
        self.checks = self.failures = 0

    def loop(self) -> None:
        while not self.stop.wait(self.cfg.listing_check):
            self.check()

    def check(self) -> None:
        """One look at exchangeInfo; the set changes through `on_change`."""
        if not self.budget.acquire(self.cfg.market.exchange_info_weight, self.stop):
            return
        self.checks += 1
        try:
            info = fetch_exchange_info(self.session, self.cfg, self.stop, attempts=1)
            added, removed = self.changes(info)
        except ExchangeUnavailable as e:
            self.failures += 1
            log.warning("listing check failed market=%s: %s; next in %gs", self.cfg.name, e, self.cfg.listing_check)
            return
        if not added and not removed:
            return
        for symbol, reason in removed:
            log.info("symbol leaves the record market=%s symbol=%s reason=%s", self.cfg.name, symbol, reason)
        if added:
            log.info("symbols join the record market=%s symbols=%s", self.cfg.name, ",".join(added))
        self.on_change(added, removed)

    def changes(self, info: dict) -> tuple[list[str], Removed]:
        """(symbols to add, (symbol, reason) to remove) against the current set."""
        status = statuses(info)
        removed: Removed = []
        recorded = self.recorded()
        for symbol in recorded:
            if symbol not in status:
                removed.append((symbol, cont.DELISTED))
            elif status[symbol] != "TRADING":
                removed.append((symbol, cont.HALTED))
        admitted = candidates(self.cfg, info)
        current = set(recorded)
        added = [s for s in admitted if s not in current]
        trading_now = {s for s, st in status.items() if st == "TRADING"}
        if self.cfg.selection == "top":
            today = utc_day(self.clock())
            rerank = today != self.ranked_day
            if not rerank:  # between rankings only a symbol that starts trading may join
                added = [s for s in added if s not in self.trading]
            if added or rerank:
                if not self.budget.acquire(self.cfg.market.ticker_all_weight, self.stop):
                    return [], removed
                top = set(rank(admitted, fetch_volumes(self.session, self.cfg, self.stop, attempts=1), self.cfg.top_n))
                added = [s for s in added if s in top]
                if rerank:
                    gone = {s for s, _ in removed}
                    removed += [(s, cont.UNRANKED) for s in recorded if s not in top and s not in gone]
                    self.ranked_day = today
        added = mine(self.cfg, added)
        self.trading = trading_now  # only once the check succeeded: a listing is never missed
        return added, removed
