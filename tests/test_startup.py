"""Start-up against the exchange: symbols that do not trade are named and left out."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from simulator import Simulator
from tests.helpers import ROOT, CollectorProcess, market_section, read_kind, run_to_exit, wait_until, write_config


def test_non_trading_symbols_left_out_others_recorded(tmp_path):
    with Simulator(spot=dict(symbols=["BTCUSDT", "ETHUSDT", "LUNAUSDT"], not_trading=("LUNAUSDT",))) as sim:
        cfg = write_config(tmp_path, [market_section("spot", sim.spot, ["BTCUSDT", "LUNAUSDT", "NOSUCHUSDT"])])
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("recording market=spot symbols=1")
            wait_until(lambda: read_kind(tmp_path / "data", "spot", "diff_orderbooks").num_rows > 0)
            rc = proc.stop()
        finally:
            proc.kill()
    assert rc == 0
    errors = [line for line in proc.log.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert "[spot] symbols not trading on the exchange, left out: LUNAUSDT, NOSUCHUSDT" in errors[0]
    symbols = set(read_kind(tmp_path / "data", "spot", "diff_orderbooks").column("symbol").to_pylist())
    assert symbols == {"BTCUSDT"}


def test_no_symbol_left_exits_2(tmp_path):
    with Simulator(futures=dict(symbols=["BTCUSDT"])) as sim:
        cfg = write_config(tmp_path, [market_section("futures", sim.futures, ["DOGEUSDT"])])
        result = run_to_exit(cfg)
    assert result.returncode == 2
    assert "[futures] symbols: none of them is trading on the exchange" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigint_also_stops_cleanly(tmp_path):
    import signal
    with Simulator(futures=dict(symbols=["BTCUSDT"])) as sim:
        cfg = write_config(tmp_path, [market_section("futures", sim.futures, ["BTCUSDT"])])
        proc = CollectorProcess(cfg)
        try:
            proc.wait_for_log("connected conn=")
            time.sleep(1)
            t0 = time.monotonic()
            rc = proc.stop(signal.SIGINT)
            took = time.monotonic() - t0
        finally:
            proc.kill()
    assert rc == 0, proc.log
    assert took < 10  # the contract: within 10 s (generous: the real figure is about 1 s)
    assert read_kind(tmp_path / "data", "futures", "diff_orderbooks").num_rows > 0


def test_arrow_allocator_is_jemalloc_returning_pages_within_100ms():
    """Arrow's C++ parts (Parquet writers, output buffers) use the process default pool,
    which only ARROW_DEFAULT_MEMORY_POOL sets, when pyarrow loads. The collector asks for
    Arrow's jemalloc with freed pages handed back within 100 ms (BENCHMARKS.md,
    Memory), before pyarrow loads, and leaves an operator's own choice alone. A build
    without the allocator asked for is said in the log, and Python's arrays then come
    from the system allocator rather than Arrow's fallback."""
    probe = ("import collector, logging, os, pyarrow; from service.memory import check_arrow_pool; "
             "logging.basicConfig(level='INFO'); check_arrow_pool(); "
             "print(pyarrow.default_memory_pool().backend_name, os.environ['JE_ARROW_MALLOC_CONF'])")
    env = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "JE_ARROW_MALLOC_CONF")}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**env, **extra}, capture_output=True,
                              text=True, check=True)

    out = run()
    assert out.stdout.split() == ["jemalloc", "dirty_decay_ms:100,muzzy_decay_ms:0"]
    assert "arrow memory pool: jemalloc (dirty_decay_ms:100,muzzy_decay_ms:0)" in out.stderr
    out = run(ARROW_DEFAULT_MEMORY_POOL="system", JE_ARROW_MALLOC_CONF="dirty_decay_ms:0")
    assert out.stdout.split() == ["system", "dirty_decay_ms:0"]
    assert "arrow memory pool: system" in out.stderr and "WARNING" not in out.stderr
    out = run(ARROW_DEFAULT_MEMORY_POOL="nonesuch")  # as a build without it: Arrow falls back
    assert out.stdout.split()[0] == "system"
    assert "this pyarrow has no nonesuch allocator" in out.stderr


def test_each_command_has_its_own_help_with_only_its_own_options():
    own = {"run": {"--market"}, "compact": set(), "upload": {"--day"}, "status": set(), "check-config": set(),
           "verify": {"--market", "--day", "--json"}, "report": {"--day", "--market", "--out"},
           "export": {"--market", "--symbol", "--format", "--out"}}
    every = set().union(*own.values())
    for command, options in own.items():
        out = subprocess.run([sys.executable, "collector.py", command, "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        shown = set(re.findall(r"(--[a-z-]+)", out.stdout)) - {"--help", "--config"}
        assert shown == options, (command, shown)
        assert not (every - options) & shown
    top = subprocess.run([sys.executable, "collector.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert all(command in top.stdout for command in own)
    # a command's own option is refused elsewhere, with argparse's one line and exit status 2
    wrong = subprocess.run([sys.executable, "collector.py", "verify", "--format", "hftbacktest"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unrecognized arguments: --format" in wrong.stderr


def test_one_process_per_market(tmp_path):
    """`run --market M` records only M of a config that enables several (systemd's
    orderbook-collector@M), writes its own state file, and `status` shows every process;
    a market the config does not enable is refused with exit 2."""
    with Simulator(spot=dict(symbols=["BTCUSDT"]), futures=dict(symbols=["ETHUSDT"])) as sim:
        cfg = write_config(tmp_path, [market_section("spot", sim.spot, ["BTCUSDT"]),
                                      market_section("futures", sim.futures, ["ETHUSDT"])])
        refused = run_to_exit(cfg, "run", "--market", "delivery")
        proc = CollectorProcess(cfg, "run", "--market", "futures")
        try:
            proc.wait_for_log("recording market=futures")
            wait_until(lambda: (tmp_path / "data" / ".status-futures.json").exists(), timeout=15)
            status = run_to_exit(cfg, "status")
            rc = proc.stop()
        finally:
            proc.kill()
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"error: {cfg}: [delivery]: not enabled in this config (--market delivery)"
    assert rc == 0, proc.log
    assert "recording market=spot" not in proc.log
    assert read_kind(tmp_path / "data", "futures", "diff_orderbooks").num_rows > 0
    assert not (tmp_path / "data" / "spot").exists()
    assert status.returncode == 0 and "futures" in status.stdout and "spot " not in status.stdout
