"""Merge throughput and memory: `collector.py merge` of recorded trees, in a process of its
own, measured from outside (wall and CPU time, peak RSS from the kernel's rusage).

    .venv/bin/python bench/merge.py SRC [SRC ...] [--day D] [--baseline SRC]

SRC is a data_dir, e.g. a kept bench run (`bench/run.py --universe 1500,550,50 --seconds
600 --keep`, then `<kept>/data`). Naming the same tree twice is the worst case: every row
is a duplicate to drop. Prints the input rows, rows written, rows per second (input) and
peak RSS; `--baseline SRC` first merges SRC alone in the same run, as the ratio's base.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parent.parent


def rows_in(tree: Path) -> int:
    files = [f for f in tree.rglob("*.parquet") if not any(p.startswith(".") for p in f.relative_to(tree).parts)]
    return sum(ds.dataset(f, format="parquet").count_rows() for f in files)


def symbols_in(tree: Path) -> int:
    files = list(tree.glob("*/diff_orderbooks/**/*.parquet"))
    return len({s for f in files for s in ds.dataset(f).to_table(columns=["symbol"]).column("symbol").unique().to_pylist()})


def one_merge(sources: list[str], day: str | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ob-merge-"))
    cfg = work / "config.ini"
    cfg.write_text("[collector]\ndata_dir = data\n[spot]\nsymbols = BTCUSDT\n")
    out = work / "out"
    cmd = [sys.executable, str(ROOT / "collector.py"), "merge", *sources, "--out", str(out), "--config", str(cfg)]
    cmd += ["--day", day] if day else []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=work, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"merge failed:\n{err}")
    rows_read = sum(rows_in(Path(s)) for s in sources)
    written = rows_in(out)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return {"rows_read": rows_read, "rows_written": written, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "rows_per_s": rows_read / wall, "peak_rss_MiB": usage.ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+")
    p.add_argument("--day")
    p.add_argument("--baseline", help="a tree merged alone first, as the base of the ratio")
    args = p.parse_args()
    print(f"symbols (diff streams) in the first source: {symbols_in(Path(args.sources[0])):,}")
    runs = ([("baseline: " + args.baseline, [args.baseline])] if args.baseline else []) + [("merge", args.sources)]
    base = None
    for label, sources in runs:
        r = one_merge(sources, args.day)
        base = base or r
        print(f"{label}: " + "  ".join(f"{k}={v:,.1f}" for k, v in r.items())
              + f"  rows/s vs baseline={r['rows_per_s'] / base['rows_per_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
