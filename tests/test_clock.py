"""The `clock` dataset: the kernel's view of the clock and the exchange's time, once a minute
per market; a skewed exchange clock is a warning in the log and in verify, and report
draws the offset."""
from __future__ import annotations

import datetime as dt
import re

from handlers.rest.clock import kernel_clock
from research import verify
from research.report import PANELS, report
from simulator import Simulator
from storage.schemas import SCHEMAS
from tests.helpers import CollectorProcess, market_section, read_kind, wait_until, write_config


def test_kernel_clock_reads_adjtimex():
    synced, max_error, est_error = kernel_clock()
    assert isinstance(synced, bool)
    assert isinstance(max_error, int) and isinstance(est_error, int) and max_error >= 0 and est_error >= 0


def test_clock_files_for_every_market_and_a_skewed_exchange_clock_warned(tmp_path):
    """The spot exchange's clock runs 2 s behind ours: the local clock is +2,000 ms off it."""
    with Simulator(spot=dict(symbols=["BTCUSDT"], clock_skew_ms=-2000), futures=dict(symbols=["BTCUSDT"]),
                   delivery=dict(symbols=["BTCUSD_PERP"])) as sim:
        cfg = write_config(tmp_path, [market_section("spot", sim.spot, ["BTCUSDT"]),
                                      market_section("futures", sim.futures, ["BTCUSDT"]),
                                      market_section("delivery", sim.delivery, ["BTCUSD_PERP"])],
                           clock_max_offset_ms=500)
        proc = CollectorProcess(cfg)
        try:
            data = tmp_path / "data"
            for market in ("spot", "futures", "delivery"):
                wait_until(lambda market=market: read_kind(data, market, "clock").num_rows > 0, timeout=30)
            rc = proc.stop()
        finally:
            proc.kill()
    assert rc == 0, proc.log
    rows = {}
    for market in ("spot", "futures", "delivery"):
        t = read_kind(data, market, "clock")
        assert t.schema.remove_metadata() == SCHEMAS["clock"]
        rows[market] = t.to_pylist()[0]
        assert rows[market]["exchange_time"] is not None and 0 <= rows[market]["rtt_us"] < 1_000_000
    spot, futures = rows["spot"], rows["futures"]
    assert abs(spot["offset_us"] - 2_000_000) <= spot["rtt_us"] / 2 + 20_000
    assert abs(futures["offset_us"]) <= futures["rtt_us"] / 2 + 20_000
    warnings = [line for line in proc.log.splitlines() if "WARNING" in line and "off the exchange's" in line]
    assert len(warnings) == 1 and "clock market=spot" in warnings[0], proc.log
    said = re.search(r"the local clock is \+(\d+\.\d) ms off the exchange's", warnings[0])
    assert said and 1990 <= float(said.group(1)) <= 2100, warnings[0]
    assert "clock_max_offset_ms = 500" in warnings[0]
    # verify says so (a warning about the stamps, not a fault of the data), and report draws it
    spot_report = verify.verify(data, "spot", max_offset_ms=500)
    assert spot_report["clock"]["beyond_bound"] == spot_report["clock"]["samples"] >= 1
    assert any("off the exchange by more than 500 ms" in w for w in spot_report["warnings"])
    assert "WARNING clock:" in verify.render(spot_report)
    assert verify.verify(data, "futures", max_offset_ms=500)["clock"]["beyond_bound"] == 0
    day = dt.datetime.fromtimestamp(spot["sample_time"] / 1e6, dt.timezone.utc).date().isoformat()
    png, summary, titles = report(data, "spot", day, tmp_path / "report")
    assert titles == PANELS and "clock: local minus exchange time" in titles
    assert "clock: 1 samples" in summary or "clock: 2 samples" in summary
    drawn = re.search(r"clock: \d+ samples, offset at most (\d+\.\d) ms", summary)
    assert drawn and 1990 <= float(drawn.group(1)) <= 2100 and png.exists(), summary
