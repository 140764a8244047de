"""One time unit: every `*_time` column is µs, files say `schema_version = 2`, and a tree
written before (version 1: exchange times in ms, no version in the metadata) is read by
every command and the research API as µs: research.data, verify, report, export, merge,
compaction (a day of version-1 and version-2 parts) and the replay's preparation."""
from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from markets import MARKETS
from research import export, verify
from research.data import load
from research.report import report
from serve.replay import order_day
from simulator import Simulator
from storage.compact import compact_day
from storage.merge import merge, open_source
from tests.helpers import CollectorProcess, market_section, wait_until, write_config

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
TIMED = ("diff_orderbooks", "partial_orderbooks", "orderbooks")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("v2")
    with Simulator(spot=dict(symbols=SYMBOLS, updates_per_s=40), futures=dict(symbols=SYMBOLS, updates_per_s=40)) as sim:
        cfg = write_config(tmp, [market_section("spot", sim.spot, SYMBOLS, snapshot_interval=2, snapshot_limit=100),
                                 market_section("futures", sim.futures, SYMBOLS, snapshot_interval=2)])
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("recording market=futures")
            wait_until(lambda: all(m.frames_sent > 200 for m in sim.markets()))
            time.sleep(2)
            assert proc.stop() == 0
        finally:
            proc.kill()
    return tmp / "data"


def as_version_1(v2: Path, out: Path) -> Path:
    """The same recording as the collector wrote it before: exchange times in ms, no version."""
    shutil.copytree(v2, out)
    for f in out.rglob("*.parquet"):
        t = pq.read_table(f)
        for name in ("event_time", "transaction_time"):
            if name in t.schema.names:
                i = t.schema.get_field_index(name)
                t = t.set_column(i, name, pc.divide(t.column(name), 1000))  # int64: truncated to ms
        pq.write_table(t.replace_schema_metadata(None), f)
    return out


def ms_then_us(t: pa.Table) -> pa.Table:
    """What a version-1 file can say of µs times: their ms, x 1000."""
    for name in ("event_time", "transaction_time"):
        if name in t.schema.names:
            i = t.schema.get_field_index(name)
            t = t.set_column(i, name, pc.multiply(pc.divide(t.column(name), 1000), 1000))
    return t


def day_of(data: Path) -> str:
    return next((data / "futures" / "diff_orderbooks").iterdir()).name


def test_every_file_says_version_2_and_every_time_is_in_us(recorded):
    files = list(recorded.rglob("*.parquet"))
    assert files
    for f in files:
        assert pq.read_schema(f).metadata[b"schema_version"] == b"2", f
    for market in ("spot", "futures"):
        diffs = load(recorded, market, "diff_orderbooks")
        received = diffs.column("received_time").to_numpy()
        event = diffs.column("event_time").to_numpy()
        # both clocks in µs: the exchange's event a few ms at most before the local arrival
        assert (abs(received - event) < 1_000_000).all(), market
        if market == "spot":  # asked with timeUnit=MICROSECOND: µs as the exchange sent them
            assert (event % 1000 != 0).any()
        else:  # futures send ms: stored x 1000, exactly
            assert (event % 1000 == 0).all() and (diffs.column("transaction_time").to_numpy() % 1000 == 0).all()


def test_a_version_1_tree_is_read_as_us_everywhere(recorded, tmp_path):
    v1 = as_version_1(recorded, tmp_path / "v1")
    day = day_of(recorded)
    for market in ("spot", "futures"):
        for kind in TIMED:
            assert load(v1, market, kind).equals(ms_then_us(load(recorded, market, kind))), (market, kind)
        assert verify.verify(v1, market)["problems"] == []
    # futures times were ms to begin with: the version-1 tree says exactly the same
    for fmt in ("tardis-l2", "tardis-snap25"):
        write, ext = export.EXPORTS[fmt]
        write(recorded, "futures", "BTCUSDT", tmp_path / f"v2{ext}")
        write(v1, "futures", "BTCUSDT", tmp_path / f"v1{ext}")
        v1_text = gzip.decompress((tmp_path / f"v1{ext}").read_bytes())
        assert v1_text.count(b"\n") > 10 and v1_text == gzip.decompress((tmp_path / f"v2{ext}").read_bytes()), fmt
    assert report(v1, "futures", day, tmp_path / "r1")[2] == report(recorded, "futures", day, tmp_path / "r2")[2]
    (tmp_path / "scratch").mkdir()
    ordered = order_day(open_source(str(v1)), day, list(MARKETS.values()), tmp_path / "scratch")
    first = ordered.first_snapshot[("futures", "BTCUSDT")].to_pylist()[0]
    expected = {r["lastUpdateId"]: r for r in load(recorded, "futures", "orderbooks", symbol="BTCUSDT").to_pylist()}
    expected = expected[first["lastUpdateId"]]
    assert (first["event_time"], first["transaction_time"]) == (expected["event_time"], expected["transaction_time"])


def test_merge_of_a_version_1_tree_writes_version_2(recorded, tmp_path):
    v1 = as_version_1(recorded, tmp_path / "v1")
    out = tmp_path / "merged"
    merge([open_source(str(v1))], out, day_of(recorded))
    for f in out.rglob("*.parquet"):
        assert pq.read_schema(f).metadata[b"schema_version"] == b"2"
    for market in ("spot", "futures"):
        got = load(out, market, "diff_orderbooks").sort_by([("symbol", "ascending"), ("final_update_id", "ascending")])
        want = ms_then_us(load(recorded, market, "diff_orderbooks")).sort_by(
            [("symbol", "ascending"), ("final_update_id", "ascending")])
        assert got.select(["event_time", "transaction_time"]).equals(want.select(["event_time", "transaction_time"]))


def test_compaction_of_a_day_of_version_1_and_version_2_parts(recorded, tmp_path):
    """The day of an upgrade: parts written before it (ms) and after (µs) in one day folder."""
    v1 = as_version_1(recorded, tmp_path / "v1")
    day = day_of(recorded)
    folder = tmp_path / "mixed" / "futures" / "diff_orderbooks"
    (folder / day).mkdir(parents=True)
    for i, f in enumerate(sorted((v1 / "futures" / "diff_orderbooks" / day).glob("*.parquet"))):
        shutil.copy(f, folder / day / f"part-0-{i:06d}.parquet")
    for i, f in enumerate(sorted((recorded / "futures" / "diff_orderbooks" / day).glob("*.parquet"))):
        shutil.copy(f, folder / day / f"part-1-{i:06d}.parquet")
    compact_day(folder, day, "diff_orderbooks", 3)
    day_file = folder / f"{day}.parquet"
    assert pq.read_schema(day_file).metadata[b"schema_version"] == b"2"
    t = pq.read_table(day_file)
    want = load(recorded, "futures", "diff_orderbooks")
    assert t.num_rows == 2 * want.num_rows
    assert sorted(t.column("event_time").to_pylist()) == sorted(want.column("event_time").to_pylist() * 2)
