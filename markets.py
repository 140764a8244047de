"""What differs between Binance Spot, USD-M Futures and COIN-M Futures (`delivery`), as
data: the one home of every market rule.

Everything market-specific the collector, the simulator and the research tools need
(paths, stream-name suffixes, REST weights, payload shapes, the continuity rule and how
a diff joins a snapshot, WebSocket limits) lives in one `Market` record, so that the
rest stays generic and a new market is a new row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable


def _spot_depth_weight(limit: int) -> int:
    # GET /api/v3/depth weights, as Binance documents them since 2023-10-19.
    if limit <= 100:
        return 5
    if limit <= 500:
        return 25
    if limit <= 1000:
        return 50
    return 250


_FUTURES_DEPTH_WEIGHTS = {5: 2, 10: 2, 20: 2, 50: 2, 100: 5, 500: 10, 1000: 20}


def _futures_depth_weight(limit: int) -> int:
    return _FUTURES_DEPTH_WEIGHTS[limit]


# a depth stream's name: (symbol in lower case, partial levels or None for diffs, speed suffix or None)
STREAM_NAME = re.compile(r"^([a-z0-9_]+)@depth(5|10|20)?(?:@(\d+ms))?$")


@dataclass(frozen=True)
class Market:
    name: str
    default_ws_url: str
    default_rest_url: str
    depth_path: str
    exchange_info_path: str
    # speed as written in config.ini -> stream-name suffix (the default speed has none)
    diff_speeds: dict[str, str]
    partial_speeds: dict[str, str]
    snapshot_limits: frozenset[int]
    depth_weight: Callable[[int], int]
    exchange_info_weight: int
    # GET <ticker_path> with no symbol: every symbol's 24h statistics (ranking for `top N`)
    ticker_path: str
    ticker_all_weight: int
    time_path: str
    default_weight_limit: int          # REQUEST_WEIGHT per minute when exchangeInfo does not say
    # Continuity, as Binance documents it for keeping a local book: a spot diff continues
    # the one before when `U <= previous u + 1` (normally equal; an overlapping window
    # after a reconnect is still complete); a futures diff when `pu == previous u` (ids
    # skip between a symbol's events, so U is never tested there).
    chains_by_pu: bool
    # futures depth payloads: diffs carry `T` and `pu`, partial depth is a diff-shaped
    # event with the top levels (spot partial depth is {lastUpdateId, bids, asks})
    futures_payloads: bool
    max_control_per_second: int
    # COIN-M's 24h volume is counted in contracts and base asset, not in the quote asset
    quote_volume_from_base: bool = False
    ws_path_prefix: str = ""           # USD-M routes market data under /public
    ws_query: str = ""                 # added to every stream URL (spot: exchange times in µs)
    max_streams_per_connection: int = 1024

    def quote_volume(self, ticker: dict) -> float:
        """A `ticker/24hr` row's traded value in the quote asset (the `top N` ranking)."""
        if self.quote_volume_from_base:
            return float(ticker.get("baseVolume") or 0) * float(ticker.get("weightedAvgPrice") or 0)
        return float(ticker.get("quoteVolume") or 0)

    def continues(self, U: int, pu: int | None, last_u: int) -> bool:
        """Does the diff (U, pu) follow the diff that ended at `last_u` with nothing between?"""
        return pu == last_u if self.chains_by_pu else U <= last_u + 1

    def joins(self, U: int, u: int, snapshot_id: int) -> bool:
        """Is the diff [U, u] the first to apply on a snapshot with lastUpdateId
        `snapshot_id`? Spot: `U <= id + 1 <= u`; futures: `U <= id <= u`."""
        return U <= snapshot_id <= u if self.chains_by_pu else U <= snapshot_id + 1 <= u

    def predates(self, u: int, snapshot_id: int) -> bool:
        """Is the diff ending at `u` already in the snapshot (to be skipped)? Spot `u <= id`,
        futures `u < id`."""
        return u < snapshot_id if self.chains_by_pu else u <= snapshot_id

    # A symbol's stream names are built here and read back with STREAM_NAME, nowhere else.
    def diff_stream(self, symbol: str, speed: str) -> str:
        return f"{symbol.lower()}@depth{self.diff_speeds[speed]}"

    def partial_stream(self, symbol: str, levels: int, speed: str) -> str:
        return f"{symbol.lower()}@depth{levels}{self.partial_speeds[speed]}"


SPOT = Market(
    name="spot",
    default_ws_url="wss://stream.binance.com:9443",
    default_rest_url="https://api.binance.com",
    depth_path="/api/v3/depth",
    exchange_info_path="/api/v3/exchangeInfo",
    diff_speeds={"100ms": "@100ms", "1000ms": ""},
    partial_speeds={"100ms": "@100ms", "1000ms": ""},
    snapshot_limits=frozenset(range(1, 5001)),
    depth_weight=_spot_depth_weight,
    exchange_info_weight=20,
    ticker_path="/api/v3/ticker/24hr",
    ticker_all_weight=80,
    time_path="/api/v3/time",
    default_weight_limit=6000,
    chains_by_pu=False,
    futures_payloads=False,
    max_control_per_second=5,
    ws_query="&timeUnit=MICROSECOND",
)

FUTURES = Market(
    name="futures",
    default_ws_url="wss://fstream.binance.com/public",
    default_rest_url="https://fapi.binance.com",
    depth_path="/fapi/v1/depth",
    exchange_info_path="/fapi/v1/exchangeInfo",
    # 0ms: `<symbol>@depth@0ms`, every book update as it happens (served, though not in the
    # documented list; what Tardis and hftbacktest record)
    diff_speeds={"0ms": "@0ms", "100ms": "@100ms", "250ms": "", "500ms": "@500ms"},
    partial_speeds={"100ms": "@100ms", "250ms": "", "500ms": "@500ms"},
    snapshot_limits=frozenset(_FUTURES_DEPTH_WEIGHTS),
    depth_weight=_futures_depth_weight,
    exchange_info_weight=1,
    ticker_path="/fapi/v1/ticker/24hr",
    ticker_all_weight=40,
    time_path="/fapi/v1/time",
    default_weight_limit=2400,
    chains_by_pu=True,
    futures_payloads=True,
    max_control_per_second=10,
    ws_path_prefix="/public",
)

# COIN-M futures: USD-M's rules and payloads (diffs carry `pu`, `T`, and also `ps`, the
# pair; snapshots also `symbol` and `pair`), symbols such as BTCUSD_PERP and ETHUSD_261225.
# Only what differs from USD-M is written here.
DELIVERY = replace(
    FUTURES,
    name="delivery",
    default_ws_url="wss://dstream.binance.com",
    default_rest_url="https://dapi.binance.com",
    depth_path="/dapi/v1/depth",
    exchange_info_path="/dapi/v1/exchangeInfo",
    ticker_path="/dapi/v1/ticker/24hr",
    time_path="/dapi/v1/time",
    ws_path_prefix="",
    quote_volume_from_base=True,
)

MARKETS: dict[str, Market] = {m.name: m for m in (SPOT, FUTURES, DELIVERY)}
PARTIAL_LEVELS = (5, 10, 20)
KINDS = ("orderbooks", "partial_orderbooks", "diff_orderbooks", "gaps", "clock")
