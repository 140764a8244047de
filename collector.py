#!/usr/bin/env python3
"""Binance Spot, USD-M and COIN-M order-book recorder.

This module only wires: parse the command line, load the config, set up logging and
signals, start the pipelines, wait, stop. The commands' bodies are in `commands.py`,
a market's threads in `pipeline.py`, who starts, watches and stops them in
`service/supervisor.py`; docs/architecture.md has the sketch of threads and processes.
"""
from __future__ import annotations

import os

# Arrow's C++ code (Parquet writers, output buffers) allocates from the process default
# pool, which `pa.set_memory_pool` does not change: only ARROW_DEFAULT_MEMORY_POOL, read
# when pyarrow loads, chooses it. Arrow's bundled jemalloc, told to give freed pages back
# to the kernel within 100 ms, keeps the column buffers' churn out of glibc's heap (peak
# RSS at 2,000 symbols 270 -> 254 MiB, CPU unchanged; BENCHMARKS.md, Memory). Set
# before pyarrow is imported anywhere; an operator's own values are left alone.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:100,muzzy_decay_ms:0")

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import requests  # noqa: E402

import commands  # noqa: E402
import config as config_mod  # noqa: E402
from commands import EXIT_CONFIG, EXIT_FAIL, EXIT_OK  # noqa: E402
from handlers.ingest.relay import StampRelay  # noqa: E402
from handlers.ingest.websocket import relay_name  # noqa: E402
from handlers.process.recovery import recover  # noqa: E402
from handlers.rest.exchange import ExchangeUnavailable, resolve_symbols  # noqa: E402
from markets import MARKETS  # noqa: E402
from pipeline import build_market, now_us  # noqa: E402
from service import metrics  # noqa: E402
from service import status as state_file  # noqa: E402
from service.logs import setup_logging  # noqa: E402
from service.loop import MainLoop  # noqa: E402
from service.memory import check_arrow_pool, tune_gc, tune_memory  # noqa: E402
from service.supervisor import Supervisor  # noqa: E402
from storage.compact import Compactor  # noqa: E402
from storage.files import clean_temp_files  # noqa: E402
from storage.upload_job import UploadJob  # noqa: E402

log = logging.getLogger("collector")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.ini"


def run(cfg: config_mod.Config, market: str | None = None) -> int:
    """Record every enabled market, or only `market` (one process per market: its own state
    file, and the uploads only in the process of the config's first market)."""
    uploads = cfg.upload.enabled and (market is None or market == cfg.markets[0].name)
    if market is not None:
        cfg = replace(cfg, markets=tuple(m for m in cfg.markets if m.name == market))
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    c = cfg.collector
    api_key = os.environ.get(config_mod.API_KEY_ENV, "").strip()  # a secret: never logged, written or shown
    if any(m.feed == "sbe" for m in cfg.markets) and not api_key:
        log.error("%s: [spot] feed = sbe needs a Binance API key (Ed25519, no permissions) in the environment "
                  "variable %s (the unit reads it from its EnvironmentFile)", cfg.path, config_mod.API_KEY_ENV)
        return EXIT_CONFIG
    c.data_dir.mkdir(parents=True, exist_ok=True)
    for leftover in clean_temp_files(c.data_dir):
        log.info("removed unfinished temporary file %s", leftover)
    session = requests.Session()
    try:
        resolved = resolve_symbols(cfg, session, stop)
    except config_mod.ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except ExchangeUnavailable as e:
        log.error("%s", e)
        return EXIT_FAIL
    if stop.is_set():
        return EXIT_OK
    for m in (r.cfg for r in resolved):
        # before anything new is written: the journal a crash left behind becomes part files
        recovered = recover(m, c.data_dir, c.compression_level, now_us)
        if recovered:
            log.warning("recovered rows from the journal after an unclean stop market=%s rows=%s", m.name, recovered)
    run_id = now_us()
    supervisor = Supervisor(stop)  # starts, watches and stops everything below, in its documented order
    # copy k of every batch is read by relay k: a relay that fails takes one copy down, never all
    relays = [StampRelay(relay_name(k)) for k in range(c.ws_redundancy)] if c.stamp_relay else []
    for relay in relays:
        supervisor.add_helper(relay)
    pipelines = [build_market(r.cfg, c, stop, session, r.weight_limit, run_id, trading=r.trading, relays=relays,
                              supervisor=supervisor,
                              headers=(f"X-MBX-APIKEY: {api_key}",) if r.cfg.feed == "sbe" else ())
                 for r in resolved]
    compactor = Compactor(c.data_dir, c.compression_level, stop, now_us, grace_s=c.flush_interval + 20,
                          memory_budget=c.compact_memory_mb << 20)
    supervisor.add("compactor", compactor)
    uploader = UploadJob(cfg, stop) if uploads else None
    if uploader is not None:
        supervisor.add("uploader", uploader)
        uploader.kick.set()
    tune_gc()
    tune_memory()
    check_arrow_pool()
    for p in pipelines:
        log.info("recording market=%s symbols=%d connections=%d data_dir=%s",
                 p.cfg.name, len(p.cfg.symbols), len(p.batches), c.data_dir)
    supervisor.start()
    if c.metrics_listen:
        try:
            metrics.serve(c.metrics_listen, pipelines, uploader, compactor, supervisor, data_dir=c.data_dir,
                          clock_max_offset_ms=c.clock_max_offset_ms)
        except OSError as e:  # recording matters more than its metrics
            log.error("metrics endpoint %s not started: %s", c.metrics_listen, e)
    loop = MainLoop(pipelines, cfg, now_us, supervisor, uploader, state_name=state_file.name_for(market))
    while not stop.wait(0.5):
        dead = loop.tick()
        if dead:
            log.critical("thread died: %s; stopping so that systemd restarts us", dead)
            loop.stopping()
            supervisor.shutdown()
            return EXIT_FAIL
    loop.stopping()
    clean = supervisor.shutdown()
    loop.final_status()
    log.info("stopped cleanly" if clean else "stopped; some threads did not finish")
    return EXIT_OK if clean else EXIT_FAIL


def day_arg(text: str) -> str:
    """A --day value: a date written YYYY-MM-DD (argparse turns the error into exit 2)."""
    import datetime as dt

    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day written YYYY-MM-DD") from None
    if len(text) != 10:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day written YYYY-MM-DD")
    return text


# command: (what it does, its body, its own options as (flags, argparse keywords))
Option = tuple[tuple[str, ...], dict[str, Any]]
COMMANDS: dict[str, tuple[str, Callable[[config_mod.Config, argparse.Namespace], int] | None, list[Option]]] = {
    "run": ("record until SIGTERM/SIGINT, then drain, write and exit 0 (the default)", None, [
        (("--market",), dict(choices=list(MARKETS), help="record only this market of the config (one process per "
                                                         "market: systemd's orderbook-collector@MARKET)"))]),
    "compact": ("compact every finished day into its day file now", commands.compact, []),
    "upload": ("compact, then upload the finished days (exit 0 only if all went up)", commands.upload, [
        (("--day",), dict(type=day_arg, help="only this day (YYYY-MM-DD)"))]),
    "status": ("what the running collector is doing (exit 1 if it is not running)", commands.status, []),
    "check-config": ("validate the config file and exit", commands.check_config, []),
    "verify": ("check recorded data: continuity, duplicates, books rebuilt against snapshots", commands.verify, [
        (("--market",), dict(choices=list(MARKETS), help="only this market")),
        (("--day",), dict(type=day_arg, help="only this day (YYYY-MM-DD)")),
        (("--json",), dict(action="store_true", help="the report as JSON"))]),
    "report": ("a PNG and a text summary of one day, per market", commands.report, [
        (("--day",), dict(required=True, type=day_arg, help="the day (YYYY-MM-DD)")),
        (("--market",), dict(choices=list(MARKETS), help="only this market")),
        (("--out",), dict(default=".", help="output folder (default: the current folder)"))]),
    "merge": ("merge several recordings (hosts, runs; local or s3://) into one gap-free set", commands.merge, [
        (("sources",), dict(nargs="+", metavar="SRC", help="a data_dir, or s3://bucket/prefix (R2_* credentials)")),
        (("--out",), dict(required=True, help="the merged data_dir (created; never one of the sources)")),
        (("--day",), dict(type=day_arg, help="only this day (YYYY-MM-DD)"))]),
    "replay": ("serve a recorded day as a Binance-compatible exchange (WebSocket + REST) until SIGTERM",
               None, [
        (("--data",), dict(required=True, help="a data_dir, or s3://bucket/prefix (R2_* credentials)")),
        (("--day",), dict(required=True, type=day_arg, help="the day (YYYY-MM-DD)")),
        (("--spot-port",), dict(required=True, type=int, help="port of the spot exchange (0: any free one, logged)")),
        (("--futures-port",), dict(required=True, type=int, help="port of USD-M futures (0: any free one)")),
        (("--delivery-port",), dict(type=int, help="port of COIN-M futures (not served without it)")),
        (("--spot-sbe-port",), dict(type=int, help="also serve the spot day as SBE binary streams on this port "
                                                   "(X-MBX-APIKEY required, any value)")),
        (("--speed",), dict(type=float, default=1.0, help="X times as fast as recorded; 0: as fast as the "
                                                         "clients read (default: 1)")),
        (("--host",), dict(default="127.0.0.1", help="address to listen on (default: loopback only)")),
        (("--start-delay",), dict(type=float, default=0.0, help="seconds between the first subscription and the "
                                                                "first frame, for other clients to subscribe")),
        (("--scratch",), dict(help="folder for the day's time-ordered copy (default: the system's temp folder)")),
        (("--symbols",), dict(help="only these symbols, e.g. BTCUSDT,ETHUSDT (default: every recorded one)")),
        (("--from",), dict(dest="start", metavar="HH:MM[:SS]", help="start at this time of the day (UTC)")),
        (("--to",), dict(dest="end", metavar="HH:MM[:SS]", help="end before this time of the day (UTC)"))]),
    "export": ("one symbol's data in another tool's format", commands.export, [
        (("--market",), dict(required=True, choices=list(MARKETS))),
        (("--symbol",), dict(required=True)),
        (("--format",), dict(required=True, choices=["tardis-l2", "tardis-snap25", "hftbacktest"])),
        (("--out",), dict(default=".", help="output folder (default: the current folder)"))]),
}


# commands that read no config.ini: their options say all they need
NO_CONFIG: dict[str, Callable[[argparse.Namespace], int]] = {"replay": commands.replay}


def parser() -> argparse.ArgumentParser:
    """`collector.py [COMMAND] [--config FILE] [options]`: each command its own --help."""
    top = argparse.ArgumentParser(prog="collector.py", description=__doc__.splitlines()[0],
                                  epilog="Without a command: run. `collector.py COMMAND --help` for a command's options.")
    top.add_argument("--config", default=str(DEFAULT_CONFIG), help="config.ini (default: %(default)s)")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, _, options) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if name not in NO_CONFIG:
            # SUPPRESS: a --config given before the command is not overwritten by this default
            p.add_argument("--config", default=argparse.SUPPRESS, help="config.ini (default: %s)" % DEFAULT_CONFIG)
        for flags, kw in options:
            p.add_argument(*flags, **kw)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = args.command or "run"
    if command in NO_CONFIG:
        setup_logging("INFO")
        return NO_CONFIG[command](args)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.collector.log_level)
    body = COMMANDS[command][1]
    if body is not None:
        return body(cfg, args)
    market = getattr(args, "market", None)
    if market is not None and market not in (m.name for m in cfg.markets):
        print(f"error: {cfg.path}: [{market}]: not enabled in this config (--market {market})", file=sys.stderr)
        return EXIT_CONFIG
    return run(cfg, market)


if __name__ == "__main__":
    sys.exit(main())
