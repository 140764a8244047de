"""`collector.py report --day D`: per market, a PNG of the recording's health, a PNG of the
books, and a short text summary.

The recording: messages per minute per symbol; gaps on a timeline; receive latency
(received_time - event_time) percentiles per minute; snapshot round trips (and snapshots
per minute, a proxy of REST weight spent); bytes on disk per kind.

The books (`report-<market>-<day>-books.png`), for the most recorded symbols: mid price
and spread over the day, and a depth heatmap (size at each price over time, from the
partial depth frames), with the day's gaps marked on the time axis.

The coverage (`report-<market>-<day>-coverage.png`, a compacted day): each symbol's
coverage in each hour, counted as the quality record counts it (storage/quality.py), and
the symbols with the lowest coverage in the summary.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on a server
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from research.data import load  # noqa: E402
from storage.files import US_PER_DAY, day_start_us  # noqa: E402

PANELS = ["messages per minute per symbol", "gaps", "receive latency (received - event time)",
          "REST snapshots", "clock: local minus exchange time", "bytes on disk per kind"]


def _load(data_dir: str | Path, market: str, kind: str, start: int, end: int, columns: list[str]) -> pa.Table | None:
    try:
        return load(data_dir, market, kind, start=start, end=end, columns=columns)
    except FileNotFoundError:
        return None


def report(data_dir: Path, market: str, day: str, out_dir: Path) -> tuple[Path, str, list[str]]:
    start = day_start_us(day)
    end = start + US_PER_DAY
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(12, 19), constrained_layout=True)
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
               - np.array(diffs.column("event_time").to_pylist(), dtype=np.int64)) / 1000.0
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
        reasons: dict[str, int] = {}
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
    summary.append(_clock_panel(axes[4], data_dir, market, start, end))
    axes[4].set_title(PANELS[4])
    sizes = {}
    for kind in ("diff_orderbooks", "partial_orderbooks", "orderbooks", "gaps"):
        folder = Path(data_dir) / market / kind
        sizes[kind] = sum(f.stat().st_size for f in folder.glob(f"{day}*.parquet")) + \
            sum(f.stat().st_size for f in (folder / day).glob("*.parquet")) if folder.exists() else 0
    for a in axes[:5]:
        a.set_xlim(0, 1440)
        a.set_xlabel("minute of the day (UTC)")
    axes[5].bar(list(sizes), [v / 2**20 for v in sizes.values()])
    axes[5].set_ylabel("MiB")
    axes[5].set_title(PANELS[5])
    summary.append("bytes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"report-{market}-{day}.png"
    fig.savefig(png, dpi=80)
    titles = [a.get_title() for a in axes]
    plt.close(fig)
    books_png = books_figure(data_dir, market, day, out_dir)
    if books_png is not None:
        summary.append(f"books: {books_png}")
    summary += coverage_figure(Path(data_dir), market, day, out_dir)
    return png, "\n".join(summary), titles


WORST = 10  # symbols listed by lowest coverage


def coverage_figure(data_dir: Path, market: str, day: str, out_dir: Path) -> list[str]:
    """The day's coverage by symbol and hour (`report-<market>-<day>-coverage.png`), computed
    as the quality record is, and the symbols with the lowest coverage; summary lines."""
    from markets import MARKETS
    from storage.quality import day_quality, hourly_coverage

    if not (data_dir / market / "diff_orderbooks" / f"{day}.parquet").exists():
        return ["coverage: the day is not compacted yet (its quality record is made then)"]
    intervals: dict = {}
    record = day_quality(data_dir / market, day, MARKETS[market].chains_by_pu, intervals).to_pylist()
    symbols, grid = hourly_coverage(intervals, day)
    fig, ax = plt.subplots(figsize=(12, max(2.5, 0.22 * len(symbols) + 1.2)), constrained_layout=True)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="RdYlGn", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ax.set_xticks(range(24))
    ax.set_xlabel("hour of the day (UTC)")
    ax.set_yticks(range(len(symbols)), symbols, fontsize=7 if len(symbols) < 60 else 4)
    ax.set_title(f"{market} {day}: coverage by hour (share of the recorded time with an unbroken diff chain; "
                 "blank: not recorded)")
    fig.colorbar(image, ax=ax, label="coverage")
    png = out_dir / f"report-{market}-{day}-coverage.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    whole = sum(1 for r in record if r["coverage"] == 1.0)
    worst = sorted((r for r in record if r["coverage"] is not None and r["coverage"] < 1.0),
                   key=lambda r: (r["coverage"], r["symbol"]))[:WORST]
    lines = [f"coverage: {whole} of {len(record)} symbols whole; plot: {png}"]
    lines += [f"  {r['symbol']:14} coverage {r['coverage']:.6f}: {r['recorded_seconds'] - r['covered_seconds']:.1f} s "
              f"uncovered, {r['gaps_sequence']} sequence, {r['gaps_reconnect']} reconnect, {r['gaps_other']} other gaps, "
              f"{r['restarts']} restarts" for r in worst]
    return lines


def _clock_panel(ax: Axes, data_dir: Path, market: str, start: int, end: int) -> str:
    """The offset of the local clock from the exchange's, a point a minute (its round trip as
    the error bar), minutes the kernel called the clock unsynchronised marked red; the
    summary's line."""
    clock = _load(data_dir, market, "clock", start, end, ["sample_time", "synced", "offset_us", "rtt_us"])
    if clock is None or clock.num_rows == 0:
        return "clock: no samples"
    rows = [r for r in clock.to_pylist() if r["offset_us"] is not None]
    unsynced = sum(1 for r in clock.to_pylist() if r["synced"] is False)
    if rows:
        minutes = [(r["sample_time"] - start) / 60e6 for r in rows]
        offsets = [r["offset_us"] / 1000 for r in rows]
        ax.errorbar(minutes, offsets, yerr=[(r["rtt_us"] or 0) / 2000 for r in rows], fmt=".", markersize=3)
        bad = [(m, o) for m, o, r in zip(minutes, offsets, rows, strict=True) if r["synced"] is False]
        if bad:
            ax.scatter([m for m, _ in bad], [o for _, o in bad], color="C3", s=8, label="kernel: not synchronised")
            ax.legend(fontsize=7)
        ax.set_ylabel("ms")
    worst = max((abs(r["offset_us"]) for r in rows), default=0) / 1000
    return (f"clock: {clock.num_rows} samples, offset at most {worst:.1f} ms, "
            f"not synchronised in {unsynced}")


BOOK_PANELS = ("mid price and spread", "depth heatmap")


def books_figure(data_dir: Path, market: str, day: str, out_dir: Path, symbols: int = 4,
                 rows_per_symbol: int = 20_000) -> Path | None:
    """Per symbol (the `symbols` with the most partial depth frames): mid price and spread
    over the day, and a heatmap of the size at each price over time; non-`start` gaps are
    red lines on the time axis. At most `rows_per_symbol` frames a symbol are drawn (evenly
    spaced), so that a busy day's picture costs what a quiet one's does."""
    start = day_start_us(day)
    end = start + US_PER_DAY
    names = _load(data_dir, market, "partial_orderbooks", start, end, ["symbol"])
    if names is None or not names.num_rows:
        return None
    counts: dict[str, int] = {}
    for sym in names.column("symbol").to_pylist():
        counts[sym] = counts.get(sym, 0) + 1
    chosen = sorted(counts, key=lambda k: -counts[k])[:symbols]
    breaks = gap_marks(data_dir, market, day)
    fig, axes = plt.subplots(len(chosen), 2, figsize=(14, 3.2 * len(chosen)), constrained_layout=True, squeeze=False)
    fig.suptitle(f"{market} {day}: books")
    for row, sym in zip(axes, chosen, strict=True):
        t = load(data_dir, market, "partial_orderbooks", symbol=sym, start=start, end=end,
                 columns=["received_time", "bid_prices", "bid_sizes", "ask_prices", "ask_sizes"])
        t = t.take(np.linspace(0, t.num_rows - 1, min(t.num_rows, rows_per_symbol)).astype(np.int64))
        minutes = (np.array(t.column("received_time").to_pylist()) - start) / 60e6
        bid_p, ask_p = t.column("bid_prices").to_pylist(), t.column("ask_prices").to_pylist()
        best_bid = np.array([b[0] if b else np.nan for b in bid_p])
        best_ask = np.array([a[0] if a else np.nan for a in ask_p])
        mid, spread = (best_bid + best_ask) / 2, best_ask - best_bid
        ax = row[0]
        ax.plot(minutes, mid, linewidth=0.7, color="C0")
        ax.set_ylabel(f"{sym} mid")
        twin = ax.twinx()
        twin.plot(minutes, spread, linewidth=0.5, color="C1", alpha=0.7)
        twin.set_ylabel("spread", color="C1")
        ax.set_title(f"{sym}: {BOOK_PANELS[0]}")
        _heatmap(row[1], minutes, t, f"{sym}: {BOOK_PANELS[1]}")
        row[1].plot(minutes, mid, linewidth=0.6, color="white")
        for ax in (*row, twin):
            ax.ticklabel_format(axis="y", useOffset=False)
        for ax in row:
            ax.set_xlabel("minute of the day (UTC)")
            for gap_sym, at in breaks:
                if gap_sym == sym:
                    ax.axvline(at, color="C3", linewidth=0.8)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"report-{market}-{day}-books.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def gap_marks(data_dir: Path, market: str, day: str) -> list[tuple[str, float]]:
    """(symbol, minute of the day) of each break of the day: its `gaps` rows but `start`."""
    start = day_start_us(day)
    gaps = _load(data_dir, market, "gaps", start, start + US_PER_DAY, ["symbol", "detected_time", "reason"])
    rows = gaps.to_pylist() if gaps is not None else []
    return [(r["symbol"], (r["detected_time"] - start) / 60e6) for r in rows if r["reason"] != "start"]


def _heatmap(ax: Axes, minutes: np.ndarray, t: pa.Table, title: str) -> None:
    """Size at each price over time (both sides, log scale), the rows' levels binned."""
    xs, ys, ws = [], [], []
    for side in ("bid", "ask"):
        prices, sizes = t.column(f"{side}_prices").to_pylist(), t.column(f"{side}_sizes").to_pylist()
        for when, p, q in zip(minutes, prices, sizes, strict=True):
            xs += [when] * len(p)
            ys += p
            ws += q
    if not xs:
        ax.set_title(title)
        return
    lo, hi = np.percentile(ys, [1, 99])
    grid, xedges, yedges = np.histogram2d(xs, ys, bins=(200, 80), range=((min(xs), max(xs) or 1), (lo, hi or 1)),
                                          weights=ws)
    ax.pcolormesh(xedges, yedges, np.log1p(grid.T), cmap="viridis", shading="auto")
    ax.set_ylabel("price")
    ax.set_title(title)
