"""The disk refuses writes while the collector runs: no crash, an error log, rows kept in
memory and written when the disk is back; past the memory bound, the loss is logged and
the journal brings the rows back at the next start."""
from __future__ import annotations

import shutil
import time

from simulator import Simulator
from tests.faults import check_run, distinct_frames
from tests.helpers import CollectorProcess, market_section, read_kind, wait_until, write_config

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def block(kind_dir):
    """A regular file where the folder was: every write below it fails with a real OSError."""
    aside = kind_dir.with_name(kind_dir.name + ".aside")
    kind_dir.rename(aside)
    kind_dir.write_text("not a folder")
    return aside


def unblock(kind_dir, aside):
    kind_dir.unlink()
    aside.rename(kind_dir)


def run_blocked(tmp_path, seconds, symbols=SYMBOLS, snapshot_interval=60, **collector):
    with Simulator(futures=dict(symbols=symbols, record=True, updates_per_s=40)) as sim:
        cfg = write_config(tmp_path, [market_section("futures", sim.futures, symbols, snapshot_limit=1000,
                                                     snapshot_interval=snapshot_interval)], **collector)
        proc = CollectorProcess(cfg)
        data = tmp_path / "data"
        kind_dir = data / "futures" / "partial_orderbooks"
        try:
            proc.wait_for_log("recording market=futures")
            wait_until(lambda: kind_dir.exists() and read_kind(data, "futures", "partial_orderbooks").num_rows > 0)
            aside = block(kind_dir)
            time.sleep(seconds)
            unblock(kind_dir, aside)
            time.sleep(2)
            sim.futures.faults.paused = True
            time.sleep(1.5)
            rc = proc.stop()
        finally:
            proc.kill()
        return sim, proc, rc, cfg


def partial_ids(data):
    t = read_kind(data, "futures", "partial_orderbooks")
    return sorted(zip(t.column("symbol").to_pylist(), t.column("final_update_id").to_pylist(), strict=True))


def sent_partial_ids(sim):
    import orjson
    return sorted((orjson.loads(s.data)["s"], orjson.loads(s.data)["u"])
                  for s in distinct_frames(sim.futures, "partial"))


def test_unwritable_folder_rows_kept_and_written_when_it_returns(tmp_path):
    sim, proc, rc, cfg = run_blocked(tmp_path, 4)
    assert rc == 0, proc.log
    assert "ERROR" in proc.log and "cannot write" in proc.log
    assert "Traceback" not in proc.log
    data = tmp_path / "data"
    assert partial_ids(data) == sent_partial_ids(sim)  # nothing lost, nothing twice
    check_run(sim.futures, data, allow_gaps=False)


def test_past_the_memory_bound_the_loss_is_logged_and_the_journal_brings_it_back(tmp_path):
    symbols = [f"S{i}USDT" for i in range(20)]  # enough rows to pass 0.02 MiB of encoded parts in 10 s
    sim, proc, rc, cfg = run_blocked(tmp_path, 10, symbols=symbols, snapshot_interval=1, max_pending_mb=0.02)
    assert "dropping unwritten rows market=futures" in proc.log
    assert "CRITICAL" in proc.log
    data = tmp_path / "data"
    assert partial_ids(data) != sent_partial_ids(sim)  # some were dropped from memory ...
    assert list((data / ".journal" / "futures").glob("seg-*.zst"))  # ... but are still journaled
    # the next start replays the journal before recording anything new
    shutil.copy(cfg, tmp_path / "again.ini")
    with Simulator(futures=dict(symbols=symbols)) as sim2:
        (tmp_path / "again.ini").write_text(cfg.read_text().replace(sim.futures.ws_url, sim2.futures.ws_url)
                                            .replace(sim.futures.rest_url, sim2.futures.rest_url))
        again = CollectorProcess(tmp_path / "again.ini")
        try:
            again.wait_for_log("recording market=futures")
            again.stop()
        finally:
            again.kill()
    assert "recovered journal segment" in again.log
    recovered = set(partial_ids(data))
    assert set(sent_partial_ids(sim)) <= recovered
