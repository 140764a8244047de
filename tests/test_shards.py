"""Several hosts, one market: `shard = i/n` splits every market's symbols by a stable hash
of the name, so that n collectors record the union exactly once."""
from __future__ import annotations

import hashlib

import orjson

from handlers.rest.exchange import shard_of
from simulator import Simulator
from tests.faults import check_run, pause_and_stop
from tests.helpers import CollectorProcess, market_section, read_kind, wait_until, write_config

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT", "TRXUSDT", "LINKUSDT"]


def test_shard_of_is_the_documented_hash():
    """The rule any tool can recompute: 1 + first 8 bytes of SHA-256 (big-endian) mod n."""
    for symbol in SYMBOLS:
        digest = hashlib.sha256(symbol.encode()).digest()
        for n in (1, 2, 3, 7):
            assert shard_of(symbol, n) == 1 + int.from_bytes(digest[:8], "big") % n
    assert shard_of("BTCUSDT", 2) == 1 + int(hashlib.sha256(b"BTCUSDT").hexdigest()[:16], 16) % 2
    # both shards of 2 hold some of these nine (else the test below would prove little)
    assert {shard_of(s, 2) for s in SYMBOLS} == {1, 2}


def test_two_hosts_on_shards_record_disjoint_sets_whose_union_is_all(tmp_path):
    with Simulator(spot=dict(symbols=SYMBOLS, record=True, updates_per_s=20)) as sim:
        procs, dirs = [], []
        for i in (1, 2):
            host = tmp_path / f"host{i}"
            host.mkdir()
            cfg = write_config(host, [market_section("spot", sim.spot, ["all"], snapshot_limit=100, partial_levels=5)],
                               shard=f"{i}/2", ws_redundancy=1)
            dirs.append(host / "data")
            procs.append(CollectorProcess(cfg))
        try:
            want = [{s for s in SYMBOLS if shard_of(s, 2) == i} for i in (1, 2)]
            for d, w in zip(dirs, want, strict=True):
                wait_until(lambda d=d, w=w: read_kind(d, "spot", "diff_orderbooks").num_rows > 0 and set(
                    read_kind(d, "spot", "diff_orderbooks").column("symbol").to_pylist()) >= w, timeout=30)
            wait_until(lambda: (dirs[0] / ".status.json").exists(), timeout=15)  # written every 5 s
            state = orjson.loads((dirs[0] / ".status.json").read_bytes())
            rcs = pause_and_stop(sim, *procs)
        finally:
            for p in procs:
                p.kill()
    assert rcs == [0, 0], [p.log[-2000:] for p in procs]
    got = [set(read_kind(d, "spot", "diff_orderbooks").column("symbol").to_pylist()) for d in dirs]
    assert got == want
    assert not got[0] & got[1] and got[0] | got[1] == set(SYMBOLS)
    for d, w in zip(dirs, want, strict=True):
        check_run(sim.spot, d, only=w)  # each exact: every diff of its symbols on disk once
    assert state["shard"] == "1/2"
    assert "[spot] symbols = all: " in procs[0].log
