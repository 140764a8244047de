"""`collector.py merge`: two hosts' recordings of the same symbols, each missing different
diffs, made into one set with every diff either received, once, and `gaps` rows only
where both missed; from local folders and from s3:// on the test S3 server alike."""
from __future__ import annotations

import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq

from simulator import Simulator
from tests.faults import pause_and_stop
from tests.helpers import CollectorProcess, market_section, read_kind, run_to_exit, wait_until, write_config
from tests.test_upload import BUCKET, env_for, s3  # noqa: F401  (s3: the fixture)

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def record_two_hosts(tmp_path: Path, seconds: float = 12.0, withhold: float = 0.05):
    """Two collectors (redundancy 1) on one simulator that withholds each diff from each
    connection with chance `withhold`; returns (sim markets, the two data_dirs, configs)."""
    kw = dict(symbols=SYMBOLS, record=True, updates_per_s=20)
    with Simulator(spot=dict(kw), futures=dict(kw)) as sim:
        for m in sim.markets():
            m.faults.withhold_diffs = withhold
        procs, dirs, cfgs = [], [], []
        for i in (1, 2):
            host = tmp_path / f"host{i}"
            host.mkdir()
            cfgs.append(write_config(host, [
                market_section("spot", sim.spot, SYMBOLS, snapshot_limit=100, partial_levels=5, snapshot_interval=5),
                market_section("futures", sim.futures, SYMBOLS, snapshot_limit=100, snapshot_interval=5)],
                ws_redundancy=1))
            dirs.append(host / "data")
            procs.append(CollectorProcess(cfgs[-1]))
        try:
            for d in dirs:
                wait_until(lambda d=d: read_kind(d, "futures", "diff_orderbooks").num_rows > 0, timeout=30)
            time.sleep(seconds)
            rcs = pause_and_stop(sim, *procs)
        finally:
            for p in procs:
                p.kill()
    assert rcs == [0, 0]
    return sim, dirs, cfgs


def diff_keys(data_dir: Path, market: str) -> list[tuple[str, int]]:
    t = read_kind(data_dir, market, "diff_orderbooks")
    return list(zip(t.column("symbol").to_pylist(), t.column("final_update_id").to_pylist(), strict=True))


def test_merge_of_two_hosts_keeps_every_diff_once_and_gaps_only_where_both_missed(tmp_path):
    sim, dirs, cfgs = record_two_hosts(tmp_path)
    out = tmp_path / "merged"
    result = run_to_exit(cfgs[0], "merge", str(dirs[0]), str(dirs[1]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "merged 2 sources" in result.stderr
    for m in sim.markets():
        market = m.market.name
        merged = diff_keys(out, market)
        assert len(merged) == len(set(merged)), "a diff written twice"
        received = set(diff_keys(dirs[0], market)) | set(diff_keys(dirs[1], market))
        assert set(merged) == received  # every diff either host received, once
        delivered = {(orjson.loads(s.data)["s"], orjson.loads(s.data)["u"]) for s in m.sent
                     if m.streams[s.stream].kind == "diff"}
        assert delivered <= received  # and each host recorded what reached it
        # gaps: only where no connection got the update
        emitted = [(s, U, u) for s, U, u, _ in m.emitted]
        gaps = read_kind(out, market, "gaps").to_pylist()
        breaks = [g for g in gaps if g["reason"] != "start"]
        for g in breaks:
            inside = [(s, u) for s, U, u in emitted if s == g["symbol"] and g["last_final_update_id"] < u
                      < g["next_first_update_id"]]
            assert inside and any(k not in delivered for k in inside), g
        # and every diff both missed, inside the merged record, is under a gaps row
        first = {s: min(u for sym, u in merged if sym == s) for s in SYMBOLS}
        last = {s: max(u for sym, u in merged if sym == s) for s in SYMBOLS}
        for s, U, u in emitted:
            if (s, u) not in received and first[s] < u < last[s]:
                assert any(g["symbol"] == s and g["last_final_update_id"] < U and u < g["next_first_update_id"]
                           for g in breaks), (s, U, u)
        host_breaks = [sum(1 for g in read_kind(d, market, "gaps").to_pylist() if g["reason"] != "start") for d in dirs]
        print(f"{market}: gaps rows host1={host_breaks[0]} host2={host_breaks[1]} merged={len(breaks)}")
        assert len(breaks) < min(host_breaks)
        assert sorted(g["symbol"] for g in gaps if g["reason"] == "start") == sorted(SYMBOLS)
        # partial frames and snapshots once, each the copy received first
        for kind, key in (("partial_orderbooks", "final_update_id"), ("orderbooks", "lastUpdateId")):
            t = read_kind(out, market, kind)
            keys = list(zip(t.column("symbol").to_pylist(), t.column(key).to_pylist(), strict=True))
            assert len(keys) == len(set(keys))
            both = [read_kind(d, market, kind).to_pylist() for d in dirs]
            earliest: dict = {}
            for r in both[0] + both[1]:
                k = (r["symbol"], r[key])
                earliest[k] = min(earliest.get(k, r["received_time"]), r["received_time"])
            assert set(keys) == set(earliest)
            assert all(r["received_time"] == earliest[(r["symbol"], r[key])] for r in t.to_pylist())
    # the merged tree is day files with the schemas, and verify finds nothing unexplained
    files = sorted(out.rglob("*.parquet"))
    assert files and all(f.parent.name in ("diff_orderbooks", "partial_orderbooks", "orderbooks", "gaps", "quality")
                         for f in files)
    verify_cfg = tmp_path / "merged.ini"
    verify_cfg.write_text(cfgs[0].read_text().replace("data_dir = data", f"data_dir = {out}"))
    check = run_to_exit(verify_cfg, "verify", "--json")
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr
    assert not any(s["unexplained_breaks"] for r in orjson.loads(check.stdout) for s in r["symbols"].values())


def test_merge_from_s3_equals_merge_from_local(tmp_path, s3):  # noqa: F811
    """The hosts' trees as they lie in a bucket (the test S3 server): the same merged rows."""
    sim, dirs, cfgs = record_two_hosts(tmp_path, seconds=4)
    for i, d in enumerate(dirs, 1):
        for f in d.rglob("*.parquet"):
            if not any(part.startswith(".") for part in f.relative_to(d).parts):
                s3["client"].upload_file(str(f), BUCKET, f"fleet/host{i}/{f.relative_to(d)}")
    # the documented one-line read of the fleet's data in place (pyarrow's S3 dataset)
    import pyarrow.dataset as ds

    from storage.upload import Credentials, s3_filesystem
    from tests.test_upload import KEY_ID, SECRET
    fs = s3_filesystem(Credentials(s3["endpoint"], KEY_ID, SECRET, BUCKET))
    in_place = ds.dataset(f"{BUCKET}/fleet/host1/futures/diff_orderbooks", filesystem=fs).to_table(
        filter=ds.field("symbol") == "BTCUSDT")
    on_disk = read_kind(dirs[0], "futures", "diff_orderbooks").filter(ds.field("symbol") == "BTCUSDT")
    assert in_place.num_rows > 0 and sorted(in_place.column("final_update_id").to_pylist()) == sorted(
        on_disk.column("final_update_id").to_pylist())
    local, remote = tmp_path / "from-local", tmp_path / "from-s3"
    a = run_to_exit(cfgs[0], "merge", str(dirs[0]), str(dirs[1]), "--out", str(local))
    b = subprocess_merge(cfgs[0], [f"s3://{BUCKET}/fleet/host1", f"s3://{BUCKET}/fleet/host2"], remote, env_for(s3))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    names = sorted(f.relative_to(local) for f in local.rglob("*.parquet"))
    assert names and names == sorted(f.relative_to(remote) for f in remote.rglob("*.parquet"))
    for name in names:
        assert pq.read_table(local / name).equals(pq.read_table(remote / name)), name


def subprocess_merge(cfg: Path, sources: list[str], out: Path, env: dict):
    import subprocess
    import sys

    from tests.helpers import ROOT
    return subprocess.run([sys.executable, str(ROOT / "collector.py"), "merge", *sources, "--out", str(out),
                           "--config", str(cfg)], capture_output=True, text=True, timeout=120, env=env, cwd=cfg.parent)
