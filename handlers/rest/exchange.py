"""What the exchange lists: which symbols trade, the REQUEST_WEIGHT limit per minute (read
live, since Binance changes it), the 24h volumes `top N` ranks by, and the choice of a
market's symbols from them (`select`), at start (`resolve_symbols`) and on every listing check."""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, replace
from typing import Any

import requests

from config import Config, ConfigError, MarketConfig
from service.backoff import backoff_delay

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (3.05, 20)


class ExchangeUnavailable(Exception):
    pass


def fetch_json(session: requests.Session, cfg: MarketConfig, path: str, stop: threading.Event,
               attempts: int = 6) -> Any:
    """GET `rest_url + path`, retried with a backoff; the decoded body."""
    url = cfg.rest_url + path
    what = path.rsplit("/", 1)[-1]
    last = ""
    for attempt in range(attempts):
        try:
            resp = session.get(url, timeout=REQUEST_TIMEOUT)
            if resp.status_code == 200:
                return resp.json()
            last = f"HTTP {resp.status_code}"
        except (requests.RequestException, ValueError) as e:
            last = type(e).__name__
        log.warning("%s failed market=%s error=%s attempt=%d", what, cfg.name, last, attempt + 1)
        if attempt + 1 < attempts and stop.wait(backoff_delay(attempt, base=1.0, cap=20.0)):
            break
    raise ExchangeUnavailable(f"[{cfg.name}] {what} at {url} failed: {last}")


def fetch_exchange_info(session: requests.Session, cfg: MarketConfig, stop: threading.Event,
                        attempts: int = 6) -> dict:
    return fetch_json(session, cfg, cfg.market.exchange_info_path, stop, attempts)


def fetch_volumes(session: requests.Session, cfg: MarketConfig, stop: threading.Event,
                  attempts: int = 6) -> dict[str, float]:
    """Every symbol's 24h traded value in its quote asset (one `ticker/24hr` call, weight
    80 on spot, 40 on the futures markets)."""
    rows = fetch_json(session, cfg, cfg.market.ticker_path, stop, attempts)
    return {r["symbol"]: cfg.market.quote_volume(r) for r in rows if isinstance(r, dict) and "symbol" in r}


def statuses(info: dict) -> dict[str, str]:
    """symbol -> its status (TRADING, HALT, BREAK, CANCEL_ONLY, ...; futures: `status` or
    `contractStatus`)."""
    return {s["symbol"]: s.get("status") or s.get("contractStatus") or "" for s in info.get("symbols", [])}


def trading_symbols(info: dict) -> set[str]:
    return {sym for sym, status in statuses(info).items() if status == "TRADING"}


def weight_limit(info: dict, default: int) -> int:
    for rl in info.get("rateLimits", []):
        if rl.get("rateLimitType") == "REQUEST_WEIGHT" and rl.get("interval") == "MINUTE":
            return int(rl["limit"]) // max(1, int(rl.get("intervalNum", 1)))
    return default


def shard_of(symbol: str, n: int) -> int:
    """Which of `n` shards records `symbol` (1..n): 1 + the first 8 bytes of the SHA-256 of
    its name (upper case, UTF-8), read as a big-endian unsigned integer, modulo n. Stable
    across hosts, versions and Python runs, and easy to compute in any tool:
    `1 + int.from_bytes(hashlib.sha256(symbol.encode()).digest()[:8], "big") % n`."""
    return 1 + int.from_bytes(hashlib.sha256(symbol.encode()).digest()[:8], "big") % n


def candidates(cfg: MarketConfig, info: dict) -> list[str]:
    """The symbols that trade and that the config admits, before any ranking: with a
    list, the listed ones (in the config's order); with `all` / `top N`, every one quoted
    in `quote_assets` (any, when empty), by name. `symbols_exclude` is never admitted.
    The shard is applied after this (and after the ranking): `mine`."""
    trading = trading_symbols(info)
    excluded = set(cfg.symbols_exclude)
    if cfg.selection == "list":
        return [s for s in cfg.symbols if s in trading and s not in excluded]
    quotes = set(cfg.quote_assets)
    return sorted(s["symbol"] for s in info.get("symbols", [])
                  if s["symbol"] in trading and s["symbol"] not in excluded
                  and (not quotes or s.get("quoteAsset") in quotes))


def mine(cfg: MarketConfig, symbols: list[str]) -> list[str]:
    """The symbols of this host's shard (`shard = i/n`; all of them at 1/1)."""
    i, n = cfg.shard
    return symbols if n == 1 else [s for s in symbols if shard_of(s, n) == i]


def rank(symbols: list[str], volumes: dict[str, float], n: int) -> list[str]:
    """The `n` of `symbols` with the highest 24h quote volume (ties by name), by name."""
    ranked = sorted(symbols, key=lambda s: (-volumes.get(s, 0.0), s))
    return sorted(ranked[:n])


def select(cfg: MarketConfig, info: dict, volumes: dict[str, float] | None) -> tuple[str, ...]:
    """The market's symbol set at start; `volumes` is needed for `top N` only."""
    found = candidates(cfg, info)
    if cfg.selection == "top":
        assert volumes is not None
        found = rank(found, volumes, cfg.top_n)
    return tuple(mine(cfg, found))


def check_symbols(cfg: MarketConfig, info: dict) -> tuple[str, ...]:
    """The configured symbols that trade; the others are named in one error line."""
    trading = trading_symbols(info)
    missing = [s for s in cfg.symbols if s not in trading]
    if missing:
        log.error("[%s] symbols not trading on the exchange, left out: %s", cfg.name, ", ".join(missing))
    return tuple(s for s in cfg.symbols if s in trading)


@dataclass(frozen=True)
class Resolved:
    """A market as the exchange lists it at start."""

    cfg: MarketConfig    # its `symbols` the set to record
    weight_limit: int               # REQUEST_WEIGHT per minute
    trading: set[str]               # every symbol trading at start


def resolve_symbols(cfg: Config, session: requests.Session, stop: threading.Event) -> list[Resolved]:
    """Each market's symbol set from exchangeInfo (and, for `top N`, the 24h volumes): a
    listed symbol that does not trade is named in one error line and left out."""
    out = []
    for m in cfg.markets:
        info = fetch_exchange_info(session, m, stop)
        if m.selection == "list":
            symbols = select(replace(m, symbols=check_symbols(m, info)), info, None)
        else:
            volumes = fetch_volumes(session, m, stop) if m.selection == "top" else None
            symbols = select(m, info, volumes)
            log.info("[%s] symbols = %s%s: %d symbols", m.name, "all" if m.selection == "all" else f"top {m.top_n}",
                     f" quoted in {','.join(m.quote_assets)}" if m.quote_assets else "", len(symbols))
        if not symbols:
            where = f" in shard {m.shard[0]}/{m.shard[1]}" if m.shard[1] > 1 else ""
            raise ConfigError(f"{cfg.path}: [{m.name}] symbols: none of them is trading on the exchange{where}")
        limit = weight_limit(info, default=m.market.default_weight_limit)
        out.append(Resolved(replace(m, symbols=symbols), limit, trading_symbols(info)))
    return out
