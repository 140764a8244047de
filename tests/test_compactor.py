"""The compactor as the running collector uses it: a child process at a lower CPU priority,
started when a finished day is due; one bad day neither stops the others nor the recorder,
and a child stopped at any moment loses and doubles nothing."""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import PipelineMetrics
from storage.compact import NICE, Compactor
from storage.files import day_start_us
from tests.helpers import ROOT, write_config
from tests.test_storage import depth20_parts, make_parts


def wait_for(condition, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_compaction_runs_in_a_niced_child_and_a_bad_day_leaves_the_others_done(tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)
    kind_dir = tmp_path / "spot" / "diff_orderbooks"
    good = make_parts(kind_dir, "2026-11-22", 3, 100, ["A", "B"])
    make_parts(kind_dir, "2026-11-23", 2, 100, ["A"])
    bad_part = kind_dir / "2026-11-23" / "part-9999999999999999-000009.parquet"
    bad_part.write_bytes(b"PAR1 not a parquet file")
    later = make_parts(kind_dir, "2026-11-24", 1, 10, ["A"])  # after the bad day
    now = day_start_us("2026-11-25") + 60_000_000
    stop = threading.Event()
    compactor = Compactor(tmp_path, 9, stop, lambda: now, grace_s=30, every_s=0.2)
    compactor.start()
    try:
        assert wait_for(lambda: "compaction failed (exit 1)" in caplog.text)
    finally:
        stop.set()
        compactor.join(15)
    assert not compactor.is_alive()
    assert compactor.failures >= 1 and compactor.runs["failed"] == compactor.failures and compactor.runs["ok"] == 0
    registry = CollectorRegistry()
    registry.register(PipelineMetrics([], compactor=compactor))
    scraped = generate_latest(registry).decode()
    assert f'obc_compactions_total{{result="failed"}} {float(compactor.failures)}' in scraped
    assert 'obc_compactions_total{result="ok"} 0.0' in scraped
    assert f"obc_compaction_failing {float(compactor.failures)}" in scraped
    day = pq.read_table(kind_dir / "2026-11-22.parquet")
    assert sorted(zip(day.column("symbol").to_pylist(), day.column("received_time").to_pylist(),
                      day.column("final_update_id").to_pylist(), strict=True)) == sorted(good)
    assert pq.read_table(kind_dir / "2026-11-24.parquet").num_rows == len(later)
    # the bad day is left as it was: its good part and the bad one, no day file, no temporaries
    assert sorted(p.name for p in (kind_dir / "2026-11-23").iterdir())[-1] == bad_part.name
    assert len(list((kind_dir / "2026-11-23").iterdir())) == 3
    assert not (kind_dir / "2026-11-23.parquet").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    err = capfd.readouterr().err  # the child writes to the collector's stderr (the journal)
    pids = {int(p) for p in re.findall(r"compaction child pid=(\d+) nice=%d budget_mib=256" % (os.nice(0) + NICE), err)}
    assert pids and os.getpid() not in pids
    assert "compaction of %s/2026-11-23 failed; its parts stay as they are" % kind_dir in err
    assert "compaction failed for 1 day(s): spot/diff_orderbooks/2026-11-23; their parts stay readable" in err
    started = {int(p) for p in re.findall(r"compaction started pid=(\d+)", caplog.text)}
    assert started == pids


def test_a_child_stopped_at_any_moment_loses_and_doubles_nothing(tmp_path):
    """SIGTERM while the child works (systemd stops the whole unit): it exits at once, and
    every row is in the day file or still in its part, exactly once; no temporary left."""
    kind_dir = tmp_path / "spot" / "partial_orderbooks"
    rows = depth20_parts(tmp_path, "2026-11-24", 6, 4000, [f"S{i:02d}USDT" for i in range(8)])
    now = day_start_us("2026-11-25") + 60_000_000
    for delay in (0.0, 0.3, 0.6, 1.0):
        child = subprocess.Popen([sys.executable, "-m", "storage.compact", str(tmp_path), "--level", "9",
                                  "--now-us", str(now), "--budget-mib", "16"], cwd=ROOT, stderr=subprocess.PIPE,
                                 text=True)
        while "compaction child pid=" not in child.stderr.readline():
            assert child.poll() is None
        time.sleep(delay)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
        # 143: stopped by its handler; -15: the signal came as the interpreter was exiting, work done
        assert child.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), err
        assert "Traceback" not in err
        assert not list(tmp_path.rglob("*.tmp"))
        ids = []
        for f in [kind_dir / "2026-11-24.parquet", *sorted((kind_dir / "2026-11-24").glob("*.parquet"))]:
            if f.exists():
                ids += pq.read_table(f, columns=["final_update_id"]).column(0).to_pylist()
        assert sorted(ids) == list(range(1, rows + 1)), delay


def test_compact_command_does_the_good_days_and_exits_1_naming_the_bad_one(tmp_path):
    config = write_config(tmp_path, ["[spot]\nsymbols = BTCUSDT\n"], compact_memory_mb=64)
    kind_dir = tmp_path / "data" / "spot" / "diff_orderbooks"
    # the command reads the machine's clock: days it finds finished on any date (two and
    # three days back, past any grace after midnight)
    today = dt.datetime.now(dt.timezone.utc).date()
    good_day, bad_day = ((today - dt.timedelta(days=n)).isoformat() for n in (3, 2))
    good = make_parts(kind_dir, good_day, 2, 50, ["BTCUSDT"])
    make_parts(kind_dir, bad_day, 1, 50, ["BTCUSDT"])
    (kind_dir / bad_day / "part-9999999999999999-000009.parquet").write_bytes(b"not parquet")
    out = subprocess.run([sys.executable, "collector.py", "compact", "--config", str(config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"compaction failed for 1 day(s): spot/diff_orderbooks/{bad_day}; their parts stay readable" in out.stderr
    assert pq.read_table(kind_dir / f"{good_day}.parquet").num_rows == len(good)
    assert len(list((kind_dir / bad_day).iterdir())) == 2
