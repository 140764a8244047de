"""Start-up checks against the exchange: which configured symbols trade, and the
REQUEST_WEIGHT limit per minute (read live, since Binance changes it)."""
from __future__ import annotations

import logging
import threading

import requests

from config import MarketConfig
from handlers.backoff import backoff_delay

log = logging.getLogger(__name__)


class ExchangeUnavailable(Exception):
    pass


def fetch_exchange_info(session: requests.Session, cfg: MarketConfig, stop: threading.Event,
                        attempts: int = 6) -> dict:
    url = cfg.rest_url + cfg.market.exchange_info_path
    last = ""
    for attempt in range(attempts):
        try:
            resp = session.get(url, timeout=(3.05, 20))
            if resp.status_code == 200:
                return resp.json()
            last = f"HTTP {resp.status_code}"
        except (requests.RequestException, ValueError) as e:
            last = type(e).__name__
        log.warning("exchangeInfo failed market=%s error=%s attempt=%d", cfg.name, last, attempt + 1)
        if stop.wait(backoff_delay(attempt, base=1.0, cap=20.0)):
            break
    raise ExchangeUnavailable(f"[{cfg.name}] exchangeInfo at {url} failed: {last}")


def trading_symbols(info: dict) -> set[str]:
    return {s["symbol"] for s in info.get("symbols", []) if s.get("status") == "TRADING"}


def weight_limit(info: dict, default: int) -> int:
    for rl in info.get("rateLimits", []):
        if rl.get("rateLimitType") == "REQUEST_WEIGHT" and rl.get("interval") == "MINUTE":
            return int(rl["limit"]) // max(1, int(rl.get("intervalNum", 1)))
    return default


def check_symbols(cfg: MarketConfig, info: dict) -> tuple[str, ...]:
    """The configured symbols that trade; the others are named in one error line."""
    trading = trading_symbols(info)
    missing = [s for s in cfg.symbols if s not in trading]
    if missing:
        log.error("[%s] symbols not trading on the exchange, left out: %s", cfg.name, ", ".join(missing))
    return tuple(s for s in cfg.symbols if s in trading)
