"""config.ini -> frozen dataclasses, validated once at start: unknown keys and bad values are refused, never defaulted.

Every error names the file, the section and the key, in one line, and is raised as
`ConfigError`; `collector.py` turns it into exit status 2.
"""
from __future__ import annotations

import configparser
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from markets import MARKETS, PARTIAL_LEVELS, Market

_SYMBOL = re.compile(r"^[A-Z0-9_]{2,32}$")


class ConfigError(Exception):
    """A config problem, phrased as one line for the operator."""


@dataclass(frozen=True)
class CollectorConfig:
    data_dir: Path
    ws_rotate_after: float
    ws_dead_after: float
    ws_redundancy: int
    flush_interval: float
    status_interval: float
    rest_weight_share: float
    compression_level: int
    queue_size: int
    max_pending_mb: float
    compact_memory_mb: int
    metrics_listen: str
    log_level: str
    shard: tuple[int, int] = (1, 1)  # (i, n): this host records shard i of n of every market's symbols
    clock_max_offset_ms: float = 100.0  # the local clock this far off the exchange's is a warning
    stamp_relay: bool = True  # sockets read by relay processes (exact stamps under load), or by their readers


@dataclass(frozen=True)
class MarketConfig:
    market: Market
    symbols: tuple[str, ...]
    ws_url: str
    rest_url: str
    diff_speed: str
    partial_levels: int
    partial_speed: str
    snapshot_interval: float
    snapshot_limit: int
    symbols_per_connection: int
    # which symbols: "list" (`symbols` as written), "all" (every TRADING one) or "top"
    # (the `top_n` with the highest 24h quote volume); with all / top, `symbols` holds the
    # set resolved at start (empty in the config as read)
    selection: str = "list"
    top_n: int = 0
    quote_assets: tuple[str, ...] = ()
    symbols_exclude: tuple[str, ...] = ()
    listing_check: float = 300.0    # seconds; 0: the set is fixed at start
    feed: str = "json"               # spot: "json" or "sbe" (binary streams: diff every 20 ms, depth20 every 50 ms)
    shard: tuple[int, int] = (1, 1)  # [collector] shard, here where the symbol set is chosen

    @property
    def name(self) -> str:
        return self.market.name

    def streams_of(self, symbol: str) -> list[str]:
        """The streams that record `symbol`: its diff stream and its partial depth stream
        (SBE: `<symbol>@depth`, every 20 ms, and `<symbol>@depth20`, every 50 ms)."""
        m = self.market
        if self.feed == "sbe":
            return [f"{symbol.lower()}@depth", f"{symbol.lower()}@depth20"]
        return [m.diff_stream(symbol, self.diff_speed), m.partial_stream(symbol, self.partial_levels, self.partial_speed)]

    @property
    def ws_query(self) -> str:
        """What a stream URL adds (spot JSON: `&timeUnit=MICROSECOND`; SBE times are µs anyway)."""
        return "" if self.feed == "sbe" else self.market.ws_query


@dataclass(frozen=True)
class UploadSettings:
    enabled: bool
    prefix: str
    include_hostname: bool
    retention_days: int
    concurrency: int
    part_size_mb: int
    checksums: str          # "sha256" (server-verified) or "none" (for servers that reject them)
    r2_compat: bool         # botocore checksum defaults "when_required" (R2 rejected the CRC32 ones)
    every_minutes: int


@dataclass(frozen=True)
class Config:
    path: Path
    collector: CollectorConfig
    markets: tuple[MarketConfig, ...]
    upload: UploadSettings


_COLLECTOR_DEFAULTS = {
    "data_dir": "data",
    "ws_rotate_after": "84600",
    "ws_dead_after": "10",
    "ws_redundancy": "2",
    "flush_interval": "30",
    "status_interval": "60",
    "rest_weight_share": "0.5",
    "compression_level": "9",
    "queue_size": "200000",
    "max_pending_mb": "1024",
    "compact_memory_mb": "256",
    "metrics_listen": "127.0.0.1:9108",
    "log_level": "info",
    "shard": "1/1",
    "clock_max_offset_ms": "100",
    "stamp_relay": "true",
}
_MARKET_KEYS = {
    "enabled", "symbols", "ws_url", "rest_url", "diff_speed", "partial_levels",
    "partial_speed", "snapshot_interval", "snapshot_limit", "symbols_per_connection",
    "quote_assets", "symbols_exclude", "listing_check", "feed",
}
SBE_WS_URL = "wss://stream-sbe.binance.com:9443"  # spot SBE market data (needs an API key: BINANCE_API_KEY)
API_KEY_ENV = "BINANCE_API_KEY"
_TOP = re.compile(r"^top\s+(\d+)$", re.IGNORECASE)
_ASSET = re.compile(r"^[A-Z0-9]{1,20}$")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class _Section:
    """Typed reads of one section; every failure names file, section and key."""

    def __init__(self, path: Path, name: str, values: dict[str, str]):
        self.path, self.name, self.values = path, name, values

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.name}] {key}: {why}")

    def text(self, key: str, default: str | None = None) -> str:
        value = self.values.get(key, default)
        if value is None:
            raise self.fail(key, "is required")
        value = value.strip()
        if not value:
            raise self.fail(key, "is empty")
        return value

    def number(self, key: str, default: str | None, lo: float, hi: float,
               kind: Callable[[str], Any] = float) -> Any:
        raw = self.text(key, default)
        try:
            value = kind(raw)
        except ValueError:
            raise self.fail(key, f"{raw!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not lo <= value <= hi:
            raise self.fail(key, f"{raw} is outside {lo:g}..{hi:g}")
        return value

    def choice(self, key: str, default: str | None, choices: Iterable[str]) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value

    def boolean(self, key: str, default: str) -> bool:
        value = self.text(key, default).lower()
        if value in ("true", "yes", "on", "1"):
            return True
        if value in ("false", "no", "off", "0"):
            return False
        raise self.fail(key, f"{value!r} is not true or false")

    def url(self, key: str, default: str, schemes: tuple[str, ...]) -> str:
        value = self.text(key, default).rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            raise self.fail(key, f"{value!r} is not a {' or '.join(schemes)} URL")
        if parts.query or parts.fragment:
            raise self.fail(key, "must not carry a query or fragment")
        return value


def load(path: str | Path) -> Config:
    path = Path(path).resolve()
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";", "#"), interpolation=None, default_section="__none__"
    )
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(f"{path}: [{e.section}] {e.option}: set twice (line {e.lineno})") from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(f"{path}: [{e.section}]: section appears twice (line {e.lineno})") from None
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"{path}: not a valid ini file: {first}") from None
    for name in parser.sections():
        if name not in ("collector", "upload") and name not in MARKETS:
            raise ConfigError(f"{path}: [{name}]: unknown section (expected collector, {', '.join(MARKETS)}, upload)")
    collector = _collector(_Section(path, "collector", dict(parser["collector"]) if parser.has_section("collector") else {}))
    collector = CollectorConfig(**{**collector.__dict__, "data_dir": (path.parent / collector.data_dir).resolve()})
    markets = tuple(
        replace(m, shard=collector.shard) for m in (_market(_Section(path, name, dict(parser[name])), MARKETS[name])
                                                    for name in MARKETS if parser.has_section(name)) if m is not None
    )
    if not markets:
        raise ConfigError(f"{path}: no market enabled: add [spot], [futures] or [delivery] with enabled = true")
    upload = _upload(_Section(path, "upload", dict(parser["upload"]) if parser.has_section("upload") else {}))
    return Config(path=path, collector=collector, markets=markets, upload=upload)


_UPLOAD_DEFAULTS = {
    "enabled": "false", "prefix": "binance-orderbooks", "include_hostname": "false", "retention_days": "7",
    "concurrency": "4", "part_size_mb": "64", "checksums": "sha256", "r2_compat": "true", "every_minutes": "10",
}


def _upload(s: _Section) -> UploadSettings:
    _check_keys(s, _UPLOAD_DEFAULTS)
    d = _UPLOAD_DEFAULTS
    prefix = s.text("prefix", d["prefix"]).strip("/")
    if not re.match(r"^[A-Za-z0-9._/-]+$", prefix):
        raise s.fail("prefix", f"{prefix!r} may hold only letters, digits, '.', '_', '-' and '/'")
    return UploadSettings(
        enabled=s.boolean("enabled", d["enabled"]),
        prefix=prefix,
        include_hostname=s.boolean("include_hostname", d["include_hostname"]),
        retention_days=s.number("retention_days", d["retention_days"], 0, 36500, int),
        concurrency=s.number("concurrency", d["concurrency"], 1, 64, int),
        part_size_mb=s.number("part_size_mb", d["part_size_mb"], 5, 5000, int),
        checksums=s.choice("checksums", d["checksums"], ("sha256", "none")),
        r2_compat=s.boolean("r2_compat", d["r2_compat"]),
        every_minutes=s.number("every_minutes", d["every_minutes"], 1, 1440, int),
    )


def _check_keys(section: _Section, allowed: Iterable[str]) -> None:
    for key in section.values:
        if key not in allowed:
            raise section.fail(key, f"unknown key (known: {', '.join(sorted(allowed))})")


def _collector(s: _Section) -> CollectorConfig:
    _check_keys(s, _COLLECTOR_DEFAULTS)
    d = _COLLECTOR_DEFAULTS
    return CollectorConfig(
        data_dir=Path(s.text("data_dir", d["data_dir"])),
        ws_rotate_after=s.number("ws_rotate_after", d["ws_rotate_after"], 10, 86000),
        ws_dead_after=s.number("ws_dead_after", d["ws_dead_after"], 1, 600),
        ws_redundancy=s.number("ws_redundancy", d["ws_redundancy"], 1, 3, int),
        flush_interval=s.number("flush_interval", d["flush_interval"], 0.1, 300),
        status_interval=s.number("status_interval", d["status_interval"], 1, 3600),
        rest_weight_share=s.number("rest_weight_share", d["rest_weight_share"], 0.01, 0.9),
        compression_level=s.number("compression_level", d["compression_level"], 1, 22, int),
        queue_size=s.number("queue_size", d["queue_size"], 100, 10_000_000, int),
        max_pending_mb=s.number("max_pending_mb", d["max_pending_mb"], 0.01, 1 << 20),
        compact_memory_mb=s.number("compact_memory_mb", d["compact_memory_mb"], 32, 1 << 20, int),
        metrics_listen=_listen(s, "metrics_listen", d["metrics_listen"]),
        log_level=s.choice("log_level", d["log_level"], _LOG_LEVELS),
        shard=_shard(s, d["shard"]),
        clock_max_offset_ms=s.number("clock_max_offset_ms", d["clock_max_offset_ms"], 1, 600_000),
        stamp_relay=s.boolean("stamp_relay", d["stamp_relay"]),
    )


def _shard(s: _Section, default: str) -> tuple[int, int]:
    """`i/n`, 1 <= i <= n."""
    value = s.text("shard", default)
    m = re.fullmatch(r"(\d+)\s*/\s*(\d+)", value)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) <= 1024:
        raise s.fail("shard", f"{value!r} is not i/n with 1 <= i <= n <= 1024 (e.g. 1/2)")
    return int(m.group(1)), int(m.group(2))


def _listen(s: _Section, key: str, default: str) -> str:
    """host:port, or "off"."""
    value = s.values.get(key, default).strip()
    if value.lower() == "off":
        return ""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise s.fail(key, f"{value!r} is not host:port (or off)")
    return value


def _names(s: _Section, key: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    """A comma-separated list of upper-case names, each checked, none twice (may be empty)."""
    raw = s.values.get(key, "")
    names = [x.strip().upper() for x in raw.replace("\n", ",").split(",") if x.strip()]
    for name in names:
        if not pattern.match(name):
            raise s.fail(key, f"{name!r} is not {what}")
    dupes = sorted(x for x, n in Counter(names).items() if n > 1)
    if dupes:
        raise s.fail(key, f"listed twice: {', '.join(dupes)}")
    return tuple(names)


def _selection(s: _Section) -> tuple[str, int, tuple[str, ...]]:
    """`symbols`: (selection, top_n, listed symbols)."""
    raw = " ".join(s.values.get("symbols", "").split())
    if raw.lower() == "all":
        return "all", 0, ()
    top = _TOP.match(raw)
    if top:
        n = int(top.group(1))
        if not 1 <= n <= 5000:
            raise s.fail("symbols", f"top {n}: N must be 1..5000")
        return "top", n, ()
    if raw.lower().startswith("top"):
        raise s.fail("symbols", f"{raw!r}: write `top N`, N a whole number")
    symbols = _names(s, "symbols", _SYMBOL, "a Binance symbol (letters and digits), `all` or `top N`")
    if not symbols:
        raise s.fail("symbols", "no symbols listed (a list, `all` or `top N`)")
    return "list", 0, symbols


def _listing_check(s: _Section) -> float:
    value = s.number("listing_check", "300", 0, 86400)
    if 0 < value < 1:
        raise s.fail("listing_check", f"{value:g}: 0 (the set fixed at start), or 1..86400 seconds")
    return value


def _feed(s: _Section, market: Market) -> str:
    """`feed` (spot only): json, or sbe, with which the speeds and levels are the SBE
    streams' own (a value other than the default is an error, not silently ignored)."""
    if market.name != "spot":
        if "feed" in s.values:
            raise s.fail("feed", "only [spot] has an SBE feed")
        return "json"
    feed = s.choice("feed", "json", ("json", "sbe"))
    if feed == "sbe":
        for key, default in (("diff_speed", "100ms"), ("partial_levels", "20"), ("partial_speed", "100ms")):
            if s.values.get(key, default) != default:
                raise s.fail(key, "does not apply with feed = sbe (diff every 20 ms, depth20 every 50 ms)")
    return feed


def _market(s: _Section, market: Market) -> MarketConfig | None:
    _check_keys(s, _MARKET_KEYS)
    if not s.boolean("enabled", "true"):
        return None
    limit = s.number("snapshot_limit", "1000", 1, 5000, int)
    if limit not in market.snapshot_limits:
        allowed = sorted(market.snapshot_limits)
        shown = f"{allowed[0]}..{allowed[-1]}" if len(allowed) > 20 else ", ".join(map(str, allowed))
        raise s.fail("snapshot_limit", f"{limit} is not one of {shown}")
    levels = s.number("partial_levels", "20", 0, 10**6, int)
    if levels not in PARTIAL_LEVELS:
        raise s.fail("partial_levels", f"{levels} is not one of {', '.join(map(str, PARTIAL_LEVELS))}")
    selection, top_n, symbols = _selection(s)
    feed = _feed(s, market)
    quote_assets = _names(s, "quote_assets", _ASSET, "an asset name (letters and digits)")
    if quote_assets and selection == "list":
        raise s.fail("quote_assets", "only applies with symbols = all or top N")
    return MarketConfig(
        market=market,
        symbols=symbols,
        selection=selection,
        top_n=top_n,
        quote_assets=quote_assets,
        symbols_exclude=_names(s, "symbols_exclude", _SYMBOL, "a Binance symbol (letters and digits)"),
        listing_check=_listing_check(s),
        ws_url=s.url("ws_url", SBE_WS_URL if feed == "sbe" else market.default_ws_url, ("ws", "wss")),
        feed=feed,
        rest_url=s.url("rest_url", market.default_rest_url, ("http", "https")),
        diff_speed=s.choice("diff_speed", "100ms", tuple(market.diff_speeds)),
        partial_levels=levels,
        partial_speed=s.choice("partial_speed", "100ms", tuple(market.partial_speeds)),
        snapshot_interval=s.number("snapshot_interval", "60", 1, 86400),
        snapshot_limit=limit,
        symbols_per_connection=s.number(
            "symbols_per_connection", "100", 1, market.max_streams_per_connection // 2, int
        ),
    )
