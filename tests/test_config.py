"""config.ini validation: every bad value is one line naming file, section and key; exit 2."""
from __future__ import annotations

import pytest

import config
from tests.helpers import ROOT, run_to_exit

GOOD = """
[collector]
data_dir = data
[spot]
symbols = BTCUSDT, ethusdt
ws_url = ws://127.0.0.1:1
rest_url = http://127.0.0.1:1
[futures]
symbols = BTCUSDT
[upload]
"""


def write(tmp_path, text):
    p = tmp_path / "config.ini"
    p.write_text(text)
    return p


def test_good_config_parses_with_defaults(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.collector.data_dir == (tmp_path / "data").resolve()
    spot, futures = cfg.markets
    assert spot.symbols == ("BTCUSDT", "ETHUSDT")
    assert futures.ws_url == "wss://fstream.binance.com/public"
    assert futures.rest_url == "https://fapi.binance.com"
    assert (spot.diff_speed, spot.partial_levels, spot.snapshot_limit) == ("100ms", 20, 1000)
    assert (cfg.collector.ws_redundancy, cfg.collector.ws_dead_after) == (2, 10)


def test_shipped_config_is_valid():
    cfg = config.load(ROOT / "config.ini")
    assert [m.name for m in cfg.markets] == ["spot", "futures"]
    assert all(len(m.symbols) == 50 for m in cfg.markets)


@pytest.mark.parametrize("section,line,key,why", [
    ("collector", "colour = blue", "colour", "unknown key"),
    ("spot", "diff_speed = 250ms", "diff_speed", "is not one of 100ms, 1000ms"),
    ("futures", "diff_speed = 1000ms", "diff_speed", "is not one of 0ms, 100ms, 250ms, 500ms"),
    ("spot", "partial_levels = 15", "partial_levels", "is not one of 5, 10, 20"),
    ("spot", "partial_speed = fast", "partial_speed", "is not one of"),
    ("futures", "snapshot_limit = 200", "snapshot_limit", "is not one of 5, 10, 20, 50, 100, 500, 1000"),
    ("spot", "snapshot_limit = 6000", "snapshot_limit", "outside"),
    ("spot", "snapshot_interval = soon", "snapshot_interval", "not a number"),
    ("futures", "ws_url = http://x", "ws_url", "is not a ws or wss URL"),
    ("spot", "enabled = maybe", "enabled", "is not true or false"),
    ("spot", "symbols = BTC-USDT", "symbols", "is not a Binance symbol"),
    ("spot", "symbols = BTCUSDT, BTCUSDT", "symbols", "listed twice"),
    ("spot", "symbols = top ten", "symbols", "write `top N`, N a whole number"),
    ("spot", "symbols = top 0", "symbols", "N must be 1..5000"),
    ("spot", "quote_assets = USDT", "quote_assets", "only applies with symbols = all or top N"),
    ("spot", "symbols_exclude = BTC/USDT", "symbols_exclude", "is not a Binance symbol"),
    ("spot", "listing_check = 0.5", "listing_check", "0 (the set fixed at start), or 1..86400 seconds"),
    ("spot", "listing_check = often", "listing_check", "not a number"),
    ("collector", "ws_rotate_after = 90000", "ws_rotate_after", "outside"),
    ("collector", "ws_redundancy = 4", "ws_redundancy", "is outside 1..3"),
    ("collector", "ws_redundancy = 0", "ws_redundancy", "is outside 1..3"),
    ("collector", "ws_redundancy = two", "ws_redundancy", "is not an integer"),
    ("collector", "compact_memory_mb = 8", "compact_memory_mb", "outside"),
    ("collector", "stamp_relay = sometimes", "stamp_relay", "is not true or false"),
    ("upload", "checksums = md5", "checksums", "is not one of sha256, none"),
    ("upload", "part_size_mb = 2", "part_size_mb", "outside"),
    ("upload", "bucket = x", "bucket", "unknown key"),
])
def test_bad_value_names_section_and_key(tmp_path, section, line, key, why):
    text = GOOD.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)
    if key == "symbols":
        text = text.replace("symbols = BTCUSDT, ethusdt\n", "")
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: [{section}] {key}: ") and why in msg, msg
    # and the command line refuses it with exactly that one line and exit status 2
    result = run_to_exit(path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {msg}"


def test_symbol_sets_and_the_delivery_market(tmp_path):
    text = GOOD.replace("symbols = BTCUSDT, ethusdt\n", "symbols = top 100\nquote_assets = usdt, USDC\n"
                        "symbols_exclude = usdcusdt\nlisting_check = 60\n")
    text = text.replace("[futures]\nsymbols = BTCUSDT\n", "[futures]\nsymbols = ALL\n") + "[delivery]\nsymbols = BTCUSD_PERP\n"
    spot, futures, delivery = config.load(write(tmp_path, text)).markets
    assert (spot.selection, spot.top_n, spot.symbols) == ("top", 100, ())
    assert (spot.quote_assets, spot.symbols_exclude, spot.listing_check) == (("USDT", "USDC"), ("USDCUSDT",), 60)
    assert (futures.selection, futures.listing_check) == ("all", 300)
    assert delivery.symbols == ("BTCUSD_PERP",)
    assert (delivery.ws_url, delivery.rest_url) == ("wss://dstream.binance.com", "https://dapi.binance.com")
    assert delivery.market.depth_path == "/dapi/v1/depth" and delivery.market.chains_by_pu


def test_empty_symbol_list(tmp_path):
    path = write(tmp_path, GOOD.replace("symbols = BTCUSDT, ethusdt", "symbols = ,"))
    result = run_to_exit(path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: [spot] symbols: no symbols listed (a list, `all` or `top N`)"


def test_missing_file_and_unknown_section(tmp_path):
    result = run_to_exit(tmp_path / "nope.ini")
    assert result.returncode == 2
    assert "nope.ini: cannot read config file" in result.stderr and "Traceback" not in result.stderr
    result = run_to_exit(write(tmp_path, GOOD + "[margin]\nsymbols = X\n"))
    assert result.returncode == 2 and "[margin]: unknown section" in result.stderr


def test_no_market_enabled(tmp_path):
    text = GOOD.replace("[spot]\n", "[spot]\nenabled = false\n").replace("[futures]\n", "[futures]\nenabled = no\n")
    result = run_to_exit(write(tmp_path, text))
    assert result.returncode == 2 and "no market enabled" in result.stderr


def test_check_config_command(tmp_path):
    result = run_to_exit(write(tmp_path, GOOD), "check-config")
    assert result.returncode == 0 and "spot: 2 symbols" in result.stdout


def test_key_set_twice(tmp_path):
    path = write(tmp_path, GOOD.replace("[futures]\n", "[futures]\ndiff_speed = 100ms\ndiff_speed = 500ms\n"))
    with pytest.raises(config.ConfigError, match=r"\[futures\] diff_speed: set twice"):
        config.load(path)
