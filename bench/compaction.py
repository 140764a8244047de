"""Compaction of one day's part files, measured: wall and CPU time, the process's peak RSS,
Arrow's peak allocation, the day file's bytes and row groups, for each memory budget given,
against a baseline compacted in the same run (by default the whole day sorted in one run,
the smallest file compaction can make).

`--data DATA_DIR` compacts a whole recording instead (every market, kind and day of a kept
bench run, e.g. `bench/run.py --symbols 1000 --seconds 60 --no-floor --keep`: a
2,000-symbol day), as the collector does (`compact_all`: the day files, then each day's
quality record), against `--collector DIR`'s code compacting the same (e.g. a checkout
from before the quality record), runs alternating, each in a process of its own on a fresh
copy: what the quality record costs.

    .venv/bin/python bench/compaction.py PARTS_DIR [--budget-mib 512 256] [--baseline-mib 0]
                                         [--collector DIR] [--level 9]
    .venv/bin/python bench/compaction.py --data DATA_DIR --collector DIR [--runs 2]

PARTS_DIR is a day folder of part files, e.g. from a kept bench run:
`bench/run.py --symbols 1000 --seconds 600 --no-floor --keep`, then
`<kept>/data/spot/partial_orderbooks/<day>`. Each case compacts a fresh copy of it in a
process of its own (`--collector DIR` runs a baseline from another checkout, e.g. a git
worktree of an older commit; the budgets always run this checkout's code).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import collector  # noqa: E402,F401  Arrow's allocator settings, inherited by the probes as by the compaction child

PROBE = """
import resource, sys, pyarrow as pa
from pathlib import Path
from storage.compact import compact_day
out = compact_day(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), memory_budget=int(sys.argv[5]))
me = resource.getrusage(resource.RUSAGE_SELF)
print(pa.default_memory_pool().max_memory(), me.ru_maxrss, me.ru_utime + me.ru_stime)
"""


def compact_copy(parts: Path, code: Path, budget: int, level: int) -> dict:
    kind, day = parts.parent.name, parts.name
    with tempfile.TemporaryDirectory(prefix="ob-compact-") as tmp:
        kind_dir = Path(tmp) / kind
        shutil.copytree(parts, kind_dir / day)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE, str(kind_dir), day, kind, str(level), str(budget)],
                             cwd=code, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            sys.exit(f"compaction failed ({code}, budget {budget}):\n{out.stderr}")
        arrow_peak, max_rss_kib, cpu = out.stdout.split()  # the child's own, not the sum over children
        day_file = pq.ParquetFile(kind_dir / f"{day}.parquet")
        return dict(wall=wall, cpu=float(cpu), rss_mib=int(max_rss_kib) / 1024, arrow_mib=int(arrow_peak) / 2**20,
                    bytes=os.path.getsize(kind_dir / f"{day}.parquet"), rows=day_file.metadata.num_rows,
                    groups=day_file.metadata.num_row_groups)


PROBE_ALL = """
import resource, sys
from pathlib import Path
from storage.compact import compact_all
done = compact_all(Path(sys.argv[1]), int(sys.argv[2]), 4_000_000_000_000_000)
me = resource.getrusage(resource.RUSAGE_SELF)
print(done, me.ru_maxrss, me.ru_utime + me.ru_stime)
"""


def compact_recording(data: Path, code: Path, level: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ob-compact-") as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(data, root)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE_ALL, str(root), str(level)], cwd=code, capture_output=True,
                             text=True)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            sys.exit(f"compaction failed ({code}):\n{out.stderr}")
        done, max_rss_kib, cpu = out.stdout.split()
        quality = sorted(root.glob("*/quality/*.parquet"))
        return dict(wall=wall, cpu=float(cpu), rss_mib=int(max_rss_kib) / 1024, days=int(done),
                    quality_rows=sum(pq.ParquetFile(q).metadata.num_rows for q in quality))


def whole_recording(args: argparse.Namespace) -> int:
    parts = list(args.data.glob("*/*/*/part-*.parquet"))
    print(f"{args.data}: {len(parts)} part files, {sum(p.stat().st_size for p in parts) / 2**20:.0f} MiB")
    cases = [("before (" + str(args.collector) + ")", args.collector), ("after (this checkout)", ROOT)]
    results: dict[str, list[dict]] = {name: [] for name, _ in cases}
    for i in range(args.runs):
        for name, code in cases:  # alternating, so that a noisy minute does not favour one
            r = compact_recording(args.data, code, args.level)
            results[name].append(r)
            print(f"run {i + 1} {name:<40} wall {r['wall']:6.1f} s  CPU {r['cpu']:6.1f} s  peak RSS {r['rss_mib']:4.0f} "
                  f"MiB  kind-days {r['days']}  quality rows {r['quality_rows']}", flush=True)
    med = {name: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in ("wall", "cpu", "rss_mib")}
           for name, rs in results.items()}
    (before, b), (after, a) = med.items()
    print(f"medians: before wall {b['wall']:.1f} s CPU {b['cpu']:.1f} s; after wall {a['wall']:.1f} s CPU {a['cpu']:.1f} s;"
          f" after / before: wall {a['wall'] / b['wall']:.3f}, CPU {a['cpu'] / b['cpu']:.3f}, "
          f"RSS {a['rss_mib'] / b['rss_mib']:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", type=Path, nargs="?", help="a day folder of part files")
    parser.add_argument("--data", type=Path, help="a whole recording's data_dir (see above)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--budget-mib", type=int, nargs="+", default=[512])
    parser.add_argument("--baseline-mib", type=int, default=0,
                        help="the baseline's budget; 0: big enough for the whole day in one run")
    parser.add_argument("--collector", type=Path, default=ROOT, help="checkout whose code compacts the baseline")
    parser.add_argument("--level", type=int, default=9)
    args = parser.parse_args()
    if args.data is not None:
        if args.collector == ROOT:
            parser.error("--data compares with another checkout's code: give --collector DIR")
        return whole_recording(args)
    if args.parts is None:
        parser.error("a PARTS_DIR, or --data DATA_DIR")
    parts = sorted(args.parts.glob("part-*.parquet"))
    if not parts:
        sys.exit(f"no part files in {args.parts}")
    encoded = sum(p.stat().st_size for p in parts)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    print(f"{args.parts}: {len(parts)} parts, {rows:,} rows, {encoded / 2**20:.0f} MiB encoded")
    baseline_budget = (args.baseline_mib << 20) or (1 << 50)
    cases = [("baseline" + (f" ({args.collector})" if args.collector != ROOT else ""), args.collector,
              baseline_budget)]
    cases += [(f"budget {mib} MiB", ROOT, mib << 20) for mib in args.budget_mib]
    print(f"{'case':<36} {'wall s':>7} {'CPU s':>7} {'peak RSS MiB':>13} {'Arrow peak MiB':>15} "
          f"{'bytes/row':>10} {'row groups':>11}  vs baseline: CPU, RSS, bytes")
    base = None
    for name, code, budget in cases:
        r = compact_copy(args.parts, code, budget, args.level)
        if r["rows"] != rows:
            sys.exit(f"{name}: {r['rows']} rows written, {rows} in the parts")
        base = base or r
        ratios = (f"{r['cpu'] / base['cpu']:.2f}  {r['rss_mib'] / base['rss_mib']:.2f}  "
                  f"{r['bytes'] / base['bytes']:.3f}")
        print(f"{name:<36} {r['wall']:7.1f} {r['cpu']:7.1f} {r['rss_mib']:13.0f} {r['arrow_mib']:15.0f} "
              f"{r['bytes'] / rows:10.1f} {r['groups']:11d}  {ratios}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
