"""UTC midnight while running, with an injected clock: rows go to the day of their
receive time, the finished day is compacted, nothing is lost at the boundary."""
from __future__ import annotations

import threading
import time
from collections import Counter

import orjson
import pyarrow.parquet as pq
import requests

import config
from pipeline import build_market
from service.supervisor import Supervisor
from simulator import Simulator
from storage.compact import Compactor
from storage.files import day_start_us
from tests.faults import distinct_frames
from tests.helpers import market_section, read_kind, write_config

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def test_midnight_rollover(tmp_path):
    midnight = day_start_us("2031-01-01")
    offset = midnight - 4_000_000 - time.time_ns() // 1000  # the collector's clock reads 23:59:56

    def clock() -> int:
        return time.time_ns() // 1000 + offset

    with Simulator(futures=dict(symbols=SYMBOLS, record=True, updates_per_s=40)) as sim:
        path = write_config(tmp_path, [market_section("futures", sim.futures, SYMBOLS, snapshot_interval=2,
                                                      snapshot_limit=50)], flush_interval=1)
        cfg = config.load(path)
        stop = threading.Event()
        supervisor = Supervisor(stop)
        build_market(cfg.markets[0], cfg.collector, stop, requests.Session(), 2400, run_id=clock(), now_us=clock,
                     supervisor=supervisor)
        supervisor.add("compactor", Compactor(cfg.collector.data_dir, 9, stop, clock, grace_s=2, every_s=0.5))
        supervisor.start()
        time.sleep(9)  # 23:59:56 -> 00:00:05
        sim.futures.faults.paused = True
        time.sleep(1.5)
        assert supervisor.shutdown()
    root = cfg.collector.data_dir / "futures"
    for kind in ("diff_orderbooks", "partial_orderbooks", "orderbooks", "gaps"):
        day_file = root / kind / "2030-12-31.parquet"
        assert day_file.exists(), kind  # compacted after midnight + grace, while running
        assert not (root / kind / "2030-12-31").exists()
        col = "detected_time" if kind == "gaps" else "received_time"
        before = pq.read_table(day_file).column(col).to_pylist()
        assert before and max(before) < midnight
        if kind != "gaps":
            after = read_kind(cfg.collector.data_dir, "futures", kind).column(col).to_pylist()
            assert any(t >= midnight for t in after), kind
            parts = list((root / kind / "2031-01-01").glob("part-*.parquet"))
            assert parts and all(min(pq.read_table(p).column(col).to_pylist()) >= midnight for p in parts)
    # nothing lost or doubled at the boundary
    sent = Counter((orjson.loads(s.data)["s"], orjson.loads(s.data)["u"])
                   for s in distinct_frames(sim.futures, "diff"))
    t = read_kind(cfg.collector.data_dir, "futures", "diff_orderbooks")
    on_disk = Counter(zip(t.column("symbol").to_pylist(), t.column("final_update_id").to_pylist(), strict=True))
    assert on_disk == sent
