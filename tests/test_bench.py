"""The benchmark's smoke run (bench/run.py --smoke): it runs, it prints every figure, and
the collector loses nothing under it. Figures are never asserted here (shared, noisy
machines); they live in BENCHMARKS.md."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.parametrize("profile", ["100ms", "finest"])
def test_bench_smoke_runs_and_loses_nothing(profile, tmp_path):
    """`finest`: spot SBE and USD-M every event (bench/run.py --profiles). The bench gets a
    temporary folder of its own, so that another run's folder (the other profile's, at
    the same time under xdist) is never taken for one it left behind."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--profiles", profile], cwd=ROOT,
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("smoke:"))
    figures = dict(re.findall(r"(\S+)=([\d,.]+|nan)", line))
    for key in ("offered/s", "recorded/s", "collector_us", "floor_us", "ratio", "peak_rss_MiB",
                "delay_p50_ms", "delay_p99_ms", "late_p99_ms", "late_p99.9_ms", "late_max_ms", "since_write_p99_ms",
                "sim_write_p99_ms", "lost_diffs", "exit"):
        assert key in figures, key
    assert figures["late_p99_ms"] != "nan"  # every frame found its connection's write
    assert figures["lost_diffs"] == "0.0" and figures["exit"] == "0.0"
    assert float(figures["recorded/s"].replace(",", "")) > 0
    assert not list(tmp_path.glob("ob-bench-*"))  # its run's folder is removed


def test_stage_bench_prints_every_stage():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "stages.py"), "--symbols", "5", "--seconds", "2",
                          "--repeat", "1"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in ("decode+route+check+append", "levels to Arrow (build)", "Parquet ZSTD-9 write",
                  "zstd -19 of the raw JSON"):
        assert out.stdout.count(stage) == 2, stage  # spot and futures


def test_encoding_bench_prints_every_candidate():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "encodings.py"), "--symbols", "3", "--seconds", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("+ delta for int64") == 4  # two kinds in two markets
    assert "raw JSON at zstd -19" in out.stdout


def test_compaction_bench_prints_every_case_and_leaves_the_parts(tmp_path):
    from tests.test_storage import depth20_parts

    depth20_parts(tmp_path, "2026-11-24", 4, 2000, [f"S{i:02d}USDT" for i in range(6)])
    parts = tmp_path / "spot" / "partial_orderbooks" / "2026-11-24"
    before = sorted(p.name for p in parts.iterdir())
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compaction.py"), str(parts), "--budget-mib", "32",
                          "--level", "3"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith(("baseline", "budget 32 MiB"))]
    assert len(rows) == 2 and all(len(ln.split()) >= 9 for ln in rows), out.stdout
    assert "8,000 rows" in out.stdout
    assert sorted(p.name for p in parts.iterdir()) == before  # it compacts copies
