"""`collector.py report --day D`: one PNG per market and a short text summary.

Panels: messages per minute per symbol; gaps on a timeline; receive latency
(received_time - event_time) percentiles per minute; snapshot round trips (and snapshots
per minute, a proxy of REST weight spent); bytes on disk per kind.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on a server
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from research.data import load  # noqa: E402
from storage.files import US_PER_DAY, day_start_us  # noqa: E402

PANELS = ["messages per minute per symbol", "gaps", "receive latency (received - event time)",
          "REST snapshots", "bytes on disk per kind"]


def _load(data_dir, market, kind, start, end, columns):
    try:
        return load(data_dir, market, kind, start=start, end=end, columns=columns)
    except FileNotFoundError:
        return None


def report(data_dir: Path, market: str, day: str, out_dir: Path) -> tuple[Path, str, list[str]]:
    start = day_start_us(day)
    end = start + US_PER_DAY
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(12, 16), constrained_layout=True)
    fig.suptitle(f"{market} {day}")
    summary = [f"{market} {day}"]
    diffs = _load(data_dir, market, "diff_orderbooks", start, end, ["symbol", "received_time", "event_time"])
    ax = axes[0]
    if diffs is not None and diffs.num_rows:
        sym = np.array(diffs.column("symbol").to_pylist())
        minute = (np.array(diffs.column("received_time").to_pylist()) - start) // 60_000_000
        for s in sorted(set(sym)):
            counts = np.bincount(minute[sym == s], minlength=1440)
            seen = np.nonzero(counts)[0]
            ax.plot(seen, counts[seen], ".-", label=s, linewidth=0.8, markersize=3)
        ax.legend(fontsize=6, ncol=6)
        lat = (np.array(diffs.column("received_time").to_pylist(), dtype=np.int64)
               - np.array(diffs.column("event_time").to_pylist(), dtype=np.int64) * 1000) / 1000.0
        summary.append(f"diffs: {diffs.num_rows} over {len(set(sym))} symbols; receive latency p50 "
                       f"{np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
        minutes = np.unique(minute)
        for q in (50, 90, 99):
            axes[2].plot(minutes, [np.percentile(lat[minute == mm], q) for mm in minutes], ".-", label=f"p{q}",
                         markersize=3)
        axes[2].legend(fontsize=7)
        axes[2].set_ylabel("ms")
    ax.set_title(PANELS[0])
    ax.set_xlabel("minute of the day (UTC)")
    axes[1].set_title(PANELS[1])
    gaps = _load(data_dir, market, "gaps", start, end, ["symbol", "detected_time", "reason"])
    if gaps is not None and gaps.num_rows:
        g = gaps.to_pylist()
        symbols = sorted({r["symbol"] for r in g})
        for r in g:
            axes[1].scatter((r["detected_time"] - start) / 60e6, symbols.index(r["symbol"]),
                            marker="|" if r["reason"] == "start" else "x", color="C3" if r["reason"] != "start" else "C0")
        axes[1].set_yticks(range(len(symbols)), symbols, fontsize=6)
        reasons = {}
        for r in g:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        summary.append("gaps: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    else:
        summary.append("gaps: none")
    axes[2].set_title(PANELS[2])
    snaps = _load(data_dir, market, "orderbooks", start, end, ["request_time", "received_time"])
    if snaps is not None and snaps.num_rows:
        req = np.array(snaps.column("request_time").to_pylist())
        rtt = (np.array(snaps.column("received_time").to_pylist()) - req) / 1000.0
        axes[3].scatter((req - start) / 60e6, rtt, s=4)
        axes[3].set_ylabel("round trip ms")
        summary.append(f"snapshots: {snaps.num_rows}, round trip p50 {np.percentile(rtt, 50):.1f} ms, "
                       f"max {rtt.max():.1f} ms")
    axes[3].set_title(PANELS[3])
    sizes = {}
    for kind in ("diff_orderbooks", "partial_orderbooks", "orderbooks", "gaps"):
        folder = Path(data_dir) / market / kind
        sizes[kind] = sum(f.stat().st_size for f in folder.glob(f"{day}*.parquet")) + \
            sum(f.stat().st_size for f in (folder / day).glob("*.parquet")) if folder.exists() else 0
    for a in axes[:4]:
        a.set_xlim(0, 1440)
        a.set_xlabel("minute of the day (UTC)")
    axes[4].bar(list(sizes), [v / 2**20 for v in sizes.values()])
    axes[4].set_ylabel("MiB")
    axes[4].set_title(PANELS[4])
    summary.append("bytes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"report-{market}-{day}.png"
    fig.savefig(png, dpi=80)
    titles = [a.get_title() for a in axes]
    plt.close(fig)
    return png, "\n".join(summary), titles
