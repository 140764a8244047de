"""The bodies of the one-shot commands (`collector.py compact | upload | status | verify |
report | export | merge | check-config`); `collector.py` parses the command line and calls them.
Each returns the exit status."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import config as config_mod
from handlers.ingest.timestamps import wall_us as now_us
from service import status as state_file
from storage.compact import CompactionFailed, compact_all
from storage.upload_job import make_uploader

if TYPE_CHECKING:
    from serve.replay import Selection
    from storage.merge import Source

log = logging.getLogger("collector")

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def check_config(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    print(f"{cfg.path}: ok ({', '.join(f'{m.name}: {len(m.symbols)} symbols' for m in cfg.markets)})")
    return EXIT_OK


def status(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    text, running = state_file.render(cfg.collector.data_dir)
    print(text)
    return EXIT_OK if running else EXIT_FAIL


def verify(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from research import verify as verify_mod

    markets = [args.market] if args.market else [m.name for m in cfg.markets]
    return verify_mod.main(cfg.collector.data_dir, markets, args.day, args.json, cfg.collector.clock_max_offset_ms)


def compact(cfg: config_mod.Config, args: argparse.Namespace | None = None) -> int:
    return EXIT_OK if compact_now(cfg) else EXIT_FAIL


def upload(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    return upload_now(cfg, args.day, progress=sys.stderr.isatty())


def compact_now(cfg: config_mod.Config) -> bool:
    """`collector.py compact` (and the first step of `upload`), in this process; False if a
    day failed (each is logged, and named in one error line)."""
    try:
        done = compact_all(cfg.collector.data_dir, cfg.collector.compression_level, now_us(),
                           memory_budget=cfg.collector.compact_memory_mb << 20)
    except CompactionFailed as e:
        log.error("%s", e)
        return False
    log.info("compacted %d day folders", done)
    return True


def upload_now(cfg: config_mod.Config, day: str | None, progress: bool) -> int:
    """`collector.py upload`: compact what is finished, then upload it; exit 0 only if all went up."""
    from storage.upload import UploadError

    compacted = compact_now(cfg)  # the other days still go up; failed ones stay as parts
    try:
        results = make_uploader(cfg, progress).run(only_day=day)
    except UploadError as e:
        log.error("%s", e)
        return EXIT_CONFIG if "missing environment" in str(e) else EXIT_FAIL
    log.info("upload done uploaded=%d skipped=%d deleted=%d failed_days=%s", results["uploaded"],
             results["skipped"], results["deleted"], ",".join(results["days_failed"]) or "none")
    return EXIT_FAIL if results["days_failed"] or not compacted else EXIT_OK


def report(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from research.report import report

    if not args.day:
        log.error("report needs --day YYYY-MM-DD")
        return EXIT_CONFIG
    for m in [args.market] if args.market else [m.name for m in cfg.markets]:
        png, summary, _ = report(cfg.collector.data_dir, m, args.day, Path(args.out))
        print(summary)
        print(f"plot: {png}")
    return EXIT_OK


def export(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from research.export import EXPORTS

    if not (args.market and args.symbol and args.format):
        log.error("export needs --market, --symbol and --format")
        return EXIT_CONFIG
    fn, suffix = EXPORTS[args.format]
    out = Path(args.out) / f"{args.market}-{args.symbol}-{args.format}{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    n = fn(cfg.collector.data_dir, args.market, args.symbol.upper(), out)
    print(f"{out}: {n} rows")
    return EXIT_OK


def open_sources(texts: list[str]) -> list[Source]:
    """data_dir trees named on the command line: local folders or `s3://bucket/prefix`
    (read with the upload credentials). ValueError or UploadError names what is wrong."""
    from storage import merge as merge_mod

    s3 = None
    if any(text.startswith("s3://") for text in texts):
        from storage.upload import Credentials, s3_filesystem
        s3 = s3_filesystem(Credentials.from_env())
    return [merge_mod.open_source(text, s3) for text in texts]


def merge(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """`collector.py merge SRC [SRC ...] --out DIR [--day D]`: several recordings into one set."""
    import time

    from storage import merge as merge_mod
    from storage.upload import UploadError

    try:
        sources = open_sources(args.sources)
    except (ValueError, UploadError) as e:
        log.error("merge: %s", e)
        return EXIT_CONFIG
    out = Path(args.out).resolve()
    if any(s.root == str(out) for s in sources):
        log.error("merge: --out %s is one of the sources", out)
        return EXIT_CONFIG
    t0 = time.monotonic()
    written = merge_mod.merge(sources, out, day=args.day, compression_level=cfg.collector.compression_level)
    took = time.monotonic() - t0
    total = sum(written.values())
    log.info("merged %d sources into %s: %s (%d rows in %.1fs, %.0f rows/s)", len(sources), out,
             ", ".join(f"{k}={v}" for k, v in sorted(written.items())) or "nothing", total, took, total / max(took, 1e-9))
    return EXIT_OK


def replay_selection(day: str, symbols: str | None, start: str | None, end: str | None) -> Selection:
    """`--symbols A,B --from HH:MM[:SS] --to HH:MM[:SS]` as a `serve.replay.Selection`
    (times of the UTC `day`; `--to` is exclusive, `24:00` the day's end)."""
    from serve.replay import Selection
    from storage.files import day_start_us

    names = None
    if symbols is not None:
        names = frozenset(s.strip().upper() for s in symbols.split(",") if s.strip())
        if not names:
            raise ValueError(f"--symbols {symbols!r}: name at least one symbol (BTCUSDT,ETHUSDT)")

    def moment(flag: str, text: str | None) -> int | None:
        if text is None:
            return None
        m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", text)
        if not m or int(m[2]) > 59 or int(m[3] or 0) > 59 or (int(m[1]), int(m[2]), int(m[3] or 0)) > (24, 0, 0):
            raise ValueError(f"{flag} {text!r}: a time of the day, HH:MM or HH:MM:SS (00:00 to 24:00)")
        return day_start_us(day) + ((int(m[1]) * 60 + int(m[2])) * 60 + int(m[3] or 0)) * 10**6

    lo, hi = moment("--from", start), moment("--to", end)
    if lo is not None and hi is not None and lo >= hi:
        raise ValueError(f"--from {start} is not before --to {end}")
    return Selection(names, lo, hi)


def replay(args: argparse.Namespace) -> int:
    """`collector.py replay --data DIR --day D --spot-port P --futures-port Q ...`: serve a
    recorded day as a Binance-compatible exchange until SIGTERM/SIGINT."""
    import asyncio
    import signal

    from serve import replay as replay_mod
    from storage.upload import UploadError

    if args.speed < 0:
        log.error("replay: --speed %s: must be 0 (as fast as the client reads) or more", args.speed)
        return EXIT_CONFIG
    if args.start_delay < 0:
        log.error("replay: --start-delay %s: must be 0 or more", args.start_delay)
        return EXIT_CONFIG
    try:
        data, = open_sources([args.data])
    except (ValueError, UploadError) as e:
        log.error("replay: --data %s", e)
        return EXIT_CONFIG
    try:
        selection = replay_selection(args.day, args.symbols, args.start, args.end)
    except ValueError as e:
        log.error("replay: %s", e)
        return EXIT_CONFIG
    ports = {"spot": args.spot_port, "futures": args.futures_port}
    if args.delivery_port is not None:
        ports["delivery"] = args.delivery_port
    scratch = Path(args.scratch) if args.scratch else None

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await replay_mod.serve(data, args.day, ports, args.host, args.speed, args.start_delay, scratch, stop,
                                      sbe_port=args.spot_sbe_port, selection=selection)

    try:
        return asyncio.run(main())
    except OSError as e:  # a port taken, an unreadable file
        log.error("replay: %s", e)
        return EXIT_FAIL
