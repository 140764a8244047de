"""What differs between Binance Spot and USD-M Futures, as data (STYLE rule 2).

Everything market-specific the collector needs (paths, stream-name suffixes, REST
weights, the continuity rule, WebSocket limits) lives in one `Market` record, so
the handlers and the simulator stay generic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _spot_depth_weight(limit: int) -> int:
    # GET /api/v3/depth weights since 2023-10-19 (BINANCE.md section 3).
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
    # "spot": U == previous u + 1; "futures": pu == previous u (ids skip between events)
    continuity: str
    max_control_per_second: int
    max_streams_per_connection: int = 1024

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
    continuity="spot",
    max_control_per_second=5,
)

FUTURES = Market(
    name="futures",
    default_ws_url="wss://fstream.binance.com/public",
    default_rest_url="https://fapi.binance.com",
    depth_path="/fapi/v1/depth",
    exchange_info_path="/fapi/v1/exchangeInfo",
    diff_speeds={"100ms": "@100ms", "250ms": "", "500ms": "@500ms"},
    partial_speeds={"100ms": "@100ms", "250ms": "", "500ms": "@500ms"},
    snapshot_limits=frozenset(_FUTURES_DEPTH_WEIGHTS),
    depth_weight=_futures_depth_weight,
    exchange_info_weight=1,
    continuity="futures",
    max_control_per_second=10,
)

MARKETS: dict[str, Market] = {m.name: m for m in (SPOT, FUTURES)}
PARTIAL_LEVELS = (5, 10, 20)
KINDS = ("orderbooks", "partial_orderbooks", "diff_orderbooks", "gaps")
