"""`collector.py replay`: one recorded day served back as a Binance-compatible exchange.

    collector.py replay --data DIR --day D --spot-port P --futures-port Q [--delivery-port R]
                        [--speed X] [--host 127.0.0.1] [--start-delay S]
                        [--symbols A,B] [--from HH:MM[:SS]] [--to HH:MM[:SS]]

Each market is served on its own port by the loopback exchange's protocol server
(`serve/exchange.py`: combined and raw streams, SUBSCRIBE / UNSUBSCRIBE /
LIST_SUBSCRIPTIONS, pings, request weights), with the day as its source:

    data tree (local or s3://)       scratch folder, a slice at a time      event loop
    day + part files of diffs,  ──►  time-ordered runs (RUN_BYTES each, ──► merge by time ──► driver ──► ports
    partial frames, snapshots        ZSTD; levels already as the text      (a row group       └─ each symbol's
    of every market (the row         Binance sends)                         of each run)          book (REST)
    groups the selection needs)

- **Selection and slices.** `plan_day` reads the selected diffs' symbol and time columns
  (and, with --from, the snapshots' times before it: where each symbol's book starts);
  `Slices` then puts the day in order a slice of recorded time at a time (FIRST_SLICE_US,
  then twice as long each, up to LONGEST_SLICE_US), each in a thread while the one before
  is served, reading only the row groups whose statistics can hold the slice's symbols
  and times (`Selection.narrowed`). The first frame waits for the plan and one slice.
- **Order.** Day files are sorted by symbol, so a slice's rows are first put in time order:
  every RUN_BYTES of input is sorted by `received_time` (then update id) into a run on
  the scratch disk, its levels rendered as text on the way (`levels_texts`); a kind's
  runs are merged FAN_IN at a time until the final merge, across every market and
  kind, holds about FAN_IN runs. Each round of a merge takes, from every run's current
  row group, the rows up to the earliest last time among them. Memory is a row group
  per run plus one round, whatever the day's length (BENCHMARKS.md, Replay).
- **Pacing.** The clock starts when the first client subscribes (plus `--start-delay`);
  a row recorded at `received_time` t is sent at start + (t - first row's time) / X.
  X = 0 sends as fast as the slowest subscribed client reads (TCP back-pressure). Frames
  due together go out in one write per connection (at X > 0: a frame due within EARLY
  goes with them; a frame waits at most FLUSH_HOLD for others). How late each frame left is counted
  and logged when the day ends (p50, p99, max).
- **Frames.** Each diff or partial row becomes the payload Binance sends for it (spot
  `depthUpdate` and `{lastUpdateId, bids, asks}`; futures `depthUpdate` with `T` and `pu`,
  COIN-M with `ps`), to every subscribed stream of its symbol and kind, at any speed
  suffix; a partial stream of fewer levels than recorded gets the top ones.
- **Numbers.** Levels are stored as doubles, so the exchange's text is rebuilt: spot
  writes 8 decimals; futures write a symbol's own number of decimals, taken here from
  the symbol's first snapshot (or first frame). A value that text would not read back
  as the same double is written in its shortest exact form instead: a parser always
  reads the recorded value.
- **REST.** `depth` answers with the symbol's book at the replay clock (`serve.books`:
  its latest snapshot with the recorded diffs up to the clock applied, `lastUpdateId` the
  last diff's `u`), truncated to `limit` levels and to the snapshot's price range; before
  the clock, the earliest snapshot the recorded diffs join. `exchangeInfo` lists the
  selection's symbols as TRADING, tick and step sizes from the recorded decimals; the
  time endpoint tells the replay clock.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from markets import DELIVERY, MARKETS, Market
from serve import sbe
from serve.books import Books, Diff, Snapshot
from serve.exchange import Conn, ExchangeServer, Stream, ws_frame
from storage.merge import Source
from storage.schemas import SCHEMAS, exchange_times_in_us

log = logging.getLogger(__name__)

DIFF, PARTIAL, SNAPSHOTS = "diff_orderbooks", "partial_orderbooks", "orderbooks"
KINDS = (SNAPSHOTS, DIFF, PARTIAL)  # snapshots first: they give each symbol its decimals
ID = {DIFF: "final_update_id", PARTIAL: "final_update_id", SNAPSHOTS: "lastUpdateId"}
RUN_BYTES = 16 << 20      # Arrow bytes of input sorted into one run (64 MiB: peak RSS 593 MiB, not 363)
BATCH_BYTES = 256 << 10   # Arrow bytes of a run's row group (what the merge holds per run)
FAN_IN = 64               # runs merged at once
FLUSH_FRAMES = 512        # frames written at a time (at most)
EARLY = 0.0002            # at speed > 0: a frame due this soon goes now (s); sleeping for each of a
                          # burst's frames a few µs apart cost an event-loop turn each (p50 1.3 ms late)
FLUSH_HOLD = 0.001        # at speed > 0: frames are written once the first of them has waited this long (s)
HIGH_WATER = 4 << 20      # at speed 0: bytes queued to a client before the replay waits for it
LATE_BIN_US = 10          # pacing histogram: 10 µs bins up to 10 s
_run_ids = itertools.count()


# ---- the day in time order -------------------------------------------------------------
WARMUP_US = 900 * 10**6   # before --from: how far back a symbol's latest snapshot is looked for
FIRST_SLICE_US = 60 * 10**6      # the first slice of the day put in order: short, so the first frame comes soon
LONGEST_SLICE_US = 900 * 10**6   # each next slice twice as long as the one before, up to this


@dataclass(frozen=True)
class Selection:
    """What to replay of the day: some symbols (None: all), from `start_us` to `end_us`
    (µs since the epoch; None: the day's first or last row)."""
    symbols: frozenset[str] | None = None
    start_us: int | None = None
    end_us: int | None = None

    def rows(self, lo: int | None, hi: int | None) -> pc.Expression | None:
        """The selected symbols' rows received in [lo, hi). Day files are sorted by symbol,
        then time, and part files hold consecutive times, so Arrow reads only the row
        groups whose statistics can hold such rows."""
        parts = []
        if self.symbols is not None:
            parts.append(pc.field("symbol").isin(sorted(self.symbols)))
        if lo is not None:
            parts.append(pc.field("received_time") >= lo)
        if hi is not None:
            parts.append(pc.field("received_time") < hi)
        if not parts:
            return None
        expr = parts[0]
        for p in parts[1:]:
            expr = expr & p
        return expr

    def scan(self, path: str, data: Source, kind: str, lo: int | None, hi: int | None,
             **kwargs: Any) -> Iterator[pa.RecordBatch]:
        """The batches of the file at `path` that hold the selected rows received in [lo, hi)."""
        dataset = ds.dataset(path, filesystem=data.fs, format="parquet", schema=SCHEMAS[kind])
        return self.narrowed(dataset, lo, hi).to_batches(filter=self.rows(lo, hi), batch_readahead=1,
                                                         fragment_readahead=1, **kwargs)

    def narrowed(self, dataset: ds.FileSystemDataset, lo: int | None, hi: int | None) -> ds.FileSystemDataset:
        """`dataset` cut to the row groups whose statistics can hold selected rows received
        in [lo, hi).

        Arrow prunes row groups by comparisons and by an `or` of them, not by `isin`
        (measured on a day file of 349 row groups, 100 symbols: `isin` kept 317 of them,
        the equalities 33; the first frame of a 100-symbol hour waited 88 s). So the
        symbols choose the row groups as equalities, and the rows as `isin` (100
        equalities evaluated a row cost twice the read)."""
        if self.symbols is None:
            return dataset  # the times alone are comparisons
        groups = [pc.field("symbol") == s for s in sorted(self.symbols)]
        while len(groups) > 1:  # a balanced `or` (a chain of thousands would be as deep)
            groups = [groups[i] | groups[i + 1] if i + 1 < len(groups) else groups[i]
                      for i in range(0, len(groups), 2)]
        times = Selection().rows(lo, hi)
        prune = groups[0] if times is None else groups[0] & times
        fragments = [g for f in dataset.get_fragments() for g in f.split_by_row_group(prune)]
        return ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)

    def sends(self, t: int) -> bool:
        """Whether a row received at `t` is sent (not only applied to a book)."""
        return self.start_us is None or t >= self.start_us


@dataclass
class Plan:
    """What the selection holds, known before anything is put in order: each market's
    symbols and the first and last time of a diff to send."""
    symbols: dict[str, set[str]]
    first_us: int | None
    last_us: int | None
    warm_from: int | None   # diffs and snapshots from here to --from build the books, unsent

    def slices(self, selection: Selection) -> list[tuple[int, int | None]]:
        """[lo, hi) windows covering what is sent, each put in order while the one before
        is served: the first FIRST_SLICE_US long, each next twice as long, up to
        LONGEST_SLICE_US."""
        assert self.first_us is not None and self.last_us is not None
        out: list[tuple[int, int | None]] = []
        lo, width = self.first_us, FIRST_SLICE_US
        end = self.last_us + 1 if selection.end_us is None else min(selection.end_us, self.last_us + 1)
        while lo < end:
            out.append((lo, min(end, lo + width)))
            lo, width = lo + width, min(LONGEST_SLICE_US, width * 2)
        # the first from --from, or (without) with whatever came before the first diff
        first_lo = selection.start_us if selection.start_us is not None else self.warm_from
        if out and first_lo is not None:
            out[0] = (min(first_lo, out[0][0]), out[0][1])
        if out and selection.end_us is None:  # the last to the day's end: what came after the last diff
            out[-1] = (out[-1][0], None)
        return out


def plan_day(data: Source, day: str, markets: list[Market], selection: Selection) -> Plan:
    """Read the selected diffs' symbols and times only (two columns), and, with --from,
    the times of the snapshots before it: each symbol's latest one before --from is where
    its book starts (no further back than WARMUP_US)."""
    symbols: dict[str, set[str]] = {}
    first = last = None
    latest: dict[tuple[str, str], int] = {}
    for market in markets:
        symbols[market.name] = set()
        for path in data.files(market.name, DIFF, day):
            for batch in selection.scan(path, data, DIFF, selection.start_us, selection.end_us,
                                        columns=["symbol", "received_time"], batch_size=1 << 20):
                if batch.num_rows == 0:
                    continue
                symbols[market.name].update(pc.unique(batch.column("symbol")).to_pylist())
                lo, hi = (v.as_py() for v in pc.min_max(batch.column("received_time")).values())
                first, last = lo if first is None else min(first, lo), hi if last is None else max(last, hi)
        if selection.start_us is None:
            continue
        for path in data.files(market.name, SNAPSHOTS, day):
            for batch in selection.scan(path, data, SNAPSHOTS, selection.start_us - WARMUP_US, selection.start_us,
                                        columns=["symbol", "received_time"]):
                for name, t in zip(batch.column("symbol").to_pylist(), batch.column("received_time").to_pylist(),
                                   strict=True):
                    latest[(market.name, name)] = max(t, latest.get((market.name, name), t))
    warm_from: int | None
    if selection.start_us is not None:
        warm_from = min(latest.values()) if latest else selection.start_us
    else:  # the snapshots just before the first diff (a recording starts with one)
        warm_from = None if first is None else first - WARMUP_US
    return Plan(symbols, first, last, warm_from)


class Slices:
    """The day's slices (`Plan.slices`), each put in order (`order_day`, in a thread) while
    the one before is served; a slice's scratch files go once it has been served."""

    def __init__(self, data: Source, day: str, markets: list[Market], scratch: Path, selection: Selection,
                 plan: Plan):
        self.data, self.day, self.markets, self.scratch, self.selection, self.plan = (
            data, day, markets, scratch, selection, plan)
        self.windows = plan.slices(selection)
        self.places: dict[tuple[str, str], tuple[int, int]] = {}
        self.served = 0
        self._ahead: asyncio.Task | None = None

    def _order(self, k: int) -> Day:
        folder = self.scratch / f"slice-{k:05d}"
        folder.mkdir()
        return order_day(self.data, self.day, self.markets, folder, self.selection, self.windows[k],
                         warm_from=self.plan.warm_from if k == 0 else None, places=self.places)

    async def next(self) -> Day | None:
        """The next slice in order (None after the last); the one after it starts."""
        if self.served >= len(self.windows):
            return None
        task = self._ahead or asyncio.create_task(asyncio.to_thread(self._order, self.served))
        day = await task
        if self.served > 0:
            shutil.rmtree(self.scratch / f"slice-{self.served - 1:05d}", ignore_errors=True)
        self.served += 1
        self._ahead = (asyncio.create_task(asyncio.to_thread(self._order, self.served))
                       if self.served < len(self.windows) else None)
        return day


@dataclass(frozen=True)
class Run:
    path: Path
    source: int           # index into Day.sources: (market, kind)


@dataclass
class Day:
    """A recorded day as time-ordered runs on the scratch disk, plus what the server
    needs to know before the first frame: the symbols and each one's first snapshot."""

    sources: list[tuple[Market, str]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    symbols: dict[str, set[str]] = field(default_factory=dict)           # market -> symbols
    first_snapshot: dict[tuple[str, str], pa.Table] = field(default_factory=dict)  # see choose_first_snapshots
    early_snapshots: dict[tuple[str, str], list[tuple[int, pa.Table]]] = field(default_factory=dict)
    first_diff: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # (time, U) of the earliest
    first_time: int | None = None                                        # µs, the earliest row to send
    selection: Selection = field(default_factory=Selection)
    rows: dict[str, int] = field(default_factory=dict)                   # kind -> rows
    places: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # futures: decimals

    def places_of(self, market: Market, symbol: str) -> tuple[int, int]:
        """The symbol's decimals (prices, sizes) as the exchange writes them: spot 8;
        futures the symbol's own, as many as its first snapshot needs or, without one,
        the first frames of it put in order."""
        return self.places.get((market.name, symbol), (8, 8)) if market.futures_payloads else (8, 8)


def order_day(data: Source, day: str, markets: list[Market], scratch: Path, selection: Selection = Selection(),
              window: tuple[int | None, int | None] = (None, None), warm_from: int | None = None,
              places: dict[tuple[str, str], tuple[int, int]] | None = None) -> Day:
    """Sort every diff, partial and snapshot row of `day` that `selection` keeps, received
    in `window` [lo, hi) (diffs and snapshots from `warm_from`, to build the books before
    it), into time-ordered runs, then merge runs of the same kind until the final merge
    holds at most about FAN_IN. `places`: the futures symbols' decimals known already
    (shared with the day's other slices)."""
    out = Day(selection=selection)
    if places is not None:
        out.places = places
    lo, hi = window
    for market in markets:
        out.symbols[market.name] = set()
        for kind in KINDS:
            files = data.files(market.name, kind, day)
            if not files:
                continue
            source = len(out.sources)
            out.sources.append((market, kind))
            pending: list[pa.RecordBatch] = []
            size = 0
            for path in files:
                start = lo if kind == PARTIAL or warm_from is None else warm_from
                for batch in selection.scan(path, data, kind, start, hi, batch_size=65_536):
                    if batch.num_rows == 0:
                        continue
                    batch = exchange_times_in_us(batch)  # a version-1 file's ms become µs
                    pending.append(batch)
                    size += batch.nbytes
                    if size >= RUN_BYTES:
                        _write_run(out, pending, source, scratch)
                        pending, size = [], 0
            if pending:
                _write_run(out, pending, source, scratch)
    choose_first_snapshots(out)
    _reduce(out, scratch)
    return out


def _time_order(table: pa.Table, kind: str) -> np.ndarray:
    """Row order by received_time, then update id (a symbol's frames of one read share a time)."""
    return np.lexsort((table.column(ID[kind]).to_numpy(), table.column("received_time").to_numpy()))


def _group_rows(table: pa.Table) -> int:
    """Rows in a run's row group: about BATCH_BYTES (what the merge holds of each run)."""
    return max(16, int(BATCH_BYTES * table.num_rows / max(1, table.nbytes)))


def _write_run(day: Day, batches: list[pa.RecordBatch], source: int, scratch: Path) -> None:
    market, kind = day.sources[source]
    table = pa.Table.from_batches(batches)
    if table.num_rows == 0:
        return
    table = table.take(_time_order(table, kind))
    day.rows[kind] = day.rows.get(kind, 0) + table.num_rows
    times = table.column("received_time").to_numpy()
    sent = times[times >= day.selection.start_us] if day.selection.start_us is not None else times
    if len(sent):
        first = int(sent[0])
        day.first_time = first if day.first_time is None else min(day.first_time, first)
    symbols = table.column("symbol")
    day.symbols[market.name].update(pc.unique(symbols).to_pylist())
    names = symbols.to_pylist()
    if kind == SNAPSHOTS:  # each symbol's earliest few: REST answers one before the clock reaches it
        times = table.column("received_time").to_pylist()
        for i, name in enumerate(names):
            early = day.early_snapshots.setdefault((market.name, name), [])
            if len(early) < EARLY_SNAPSHOTS or times[i] < early[-1][0]:
                if not early or times[i] < early[0][0]:
                    if market.futures_payloads:
                        day.places[(market.name, name)] = _places(_row(table, i))
                early.append((times[i], table.take([i])))
                early.sort(key=lambda e: e[0])
                del early[EARLY_SNAPSHOTS:]
    else:
        earliest: dict[str, int] = {}  # each symbol's first row (the run is in time order)
        for i, name in enumerate(names):
            earliest.setdefault(name, i)
        if kind == DIFF:
            for name, i in earliest.items():
                t, known = int(times[i]), day.first_diff.get((market.name, name))
                if known is None or t < known[0]:
                    day.first_diff[(market.name, name)] = (t, table.column("first_update_id")[i].as_py())
        table = _with_text(day, market, table, names, earliest)
    path = scratch / f"run-{next(_run_ids):06d}.parquet"
    pq.write_table(table, path, row_group_size=_group_rows(table), compression="zstd", compression_level=1)
    day.runs.append(Run(path, source))


EARLY_SNAPSHOTS = 3  # a symbol's earliest snapshots kept while the day is ordered


def choose_first_snapshots(day: Day) -> None:
    """Each symbol's snapshot REST answers before the clock reaches it: the earliest one
    its first recorded diffs join. A recording's first snapshot can predate its first
    diff by a few updates (the stream opened after it); a client given that one would
    find the stream does not continue it, and start over."""
    for (market_name, name), early in day.early_snapshots.items():
        market = MARKETS[market_name]
        first = day.first_diff.get((market_name, name))
        chosen = early[0][1]
        if first is not None:
            # the diffs from the first on continue one another: any snapshot at or past the
            # first diff's start is joined by one of them (spot: U <= id + 1; futures: U <= id)
            joinable = [row for _, row in early
                        if row.column("lastUpdateId")[0].as_py() >= first[1] - (0 if market.chains_by_pu else 1)]
            chosen = joinable[0] if joinable else early[-1][1]
        day.first_snapshot[(market_name, name)] = chosen
    day.early_snapshots.clear()


def _places(row: dict) -> tuple[int, int]:
    """Decimals of prices and sizes: as many as the row's first levels need."""
    return (decimals(row["bid_prices"][:50] + row["ask_prices"][:50]),
            decimals(row["bid_sizes"][:50] + row["ask_sizes"][:50]))


def _with_text(day: Day, market: Market, table: pa.Table, names: list[str], earliest: dict[str, int]) -> pa.Table:
    """Depth rows with their levels as the text Binance sends (`bids`, `asks`: what goes
    between the brackets) instead of doubles, and their most levels a side (`levels`),
    rendered here in bulk so that serving a frame is only formatting its header.
    `names`: the rows' symbols; `earliest`: each symbol's first row."""
    if market.futures_payloads:
        for name, i in earliest.items():
            day.places.setdefault((market.name, name), _places(_row(table, i)))
    places = [day.places_of(market, name) for name in names]
    pp = np.array([p for p, _ in places], dtype=np.int64)
    sp = np.array([q for _, q in places], dtype=np.int64)
    text = {side: levels_texts(table.column(f"{side}_prices").combine_chunks(),
                               table.column(f"{side}_sizes").combine_chunks(), pp, sp) for side in ("bid", "ask")}
    levels = pc.max_element_wise(pc.list_value_length(table.column("bid_prices")),
                                 pc.list_value_length(table.column("ask_prices")))
    return (table.drop_columns(["bid_prices", "bid_sizes", "ask_prices", "ask_sizes"])
            .append_column("bids", text["bid"]).append_column("asks", text["ask"]).append_column("levels", levels))


def _reduce(day: Day, scratch: Path) -> None:
    """Merge each kind's runs FAN_IN at a time into longer runs until every kind has at
    most FAN_IN / (number of kinds) runs: the final merge then holds about FAN_IN row
    groups, however long the day (a day of 2,000 symbols is thousands of runs)."""
    limit = max(2, FAN_IN // max(1, len(day.sources)))
    for source in range(len(day.sources)):
        while len(runs := [r for r in day.runs if r.source == source]) > limit:
            others = [r for r in day.runs if r.source != source]
            day.runs = others + [_combine(runs[i:i + FAN_IN], day, scratch) for i in range(0, len(runs), FAN_IN)]


def _combine(runs: list[Run], day: Day, scratch: Path) -> Run:
    """Runs of one kind merged by time into one."""
    if len(runs) == 1:
        return runs[0]
    kind = day.sources[runs[0].source][1]
    path = scratch / f"run-{next(_run_ids):06d}.parquet"
    writer: pq.ParquetWriter | None = None
    group = 0
    for pieces in merged(runs):
        table = pa.concat_tables([p.table for p in pieces])
        table = table.take(_time_order(table, kind))
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd", compression_level=1)
            group = _group_rows(table)
        writer.write_table(table, row_group_size=group)
    assert writer is not None
    writer.close()
    for r in runs:
        r.path.unlink()
    return Run(path, runs[0].source)


class _Cursor:
    """One run, a row group at a time."""

    def __init__(self, run: Run):
        self.source = run.source
        self.file = pq.ParquetFile(run.path)
        self.group = 0
        self.table: pa.Table | None = None
        self.times = np.empty(0, dtype=np.int64)
        self.pos = 0

    def load(self) -> bool:
        if self.group >= self.file.num_row_groups:
            self.file.close()
            return False
        self.table = self.file.read_row_group(self.group)
        self.group += 1
        self.times = self.table.column("received_time").to_numpy()
        self.pos = 0
        return True


@dataclass
class Piece:
    source: int
    table: pa.Table       # rows of one run, in time order
    times: np.ndarray


def merged(runs: list[Run]) -> Iterator[list[Piece]]:
    """Rounds of rows in time order across `runs`: each round holds, from every run, its
    rows up to the earliest last time of the runs' current row groups (so no row of a
    later round is earlier than one of this round)."""
    cursors = [c for c in (_Cursor(r) for r in runs) if c.load()]
    while cursors:
        horizon = min(int(c.times[-1]) for c in cursors)
        pieces = []
        for c in cursors:
            end = int(np.searchsorted(c.times, horizon, side="right"))
            if end > c.pos:
                assert c.table is not None
                pieces.append(Piece(c.source, c.table.slice(c.pos, end - c.pos), c.times[c.pos:end]))
                c.pos = end
        cursors = [c for c in cursors if c.pos < len(c.times) or c.load()]
        yield pieces


# ---- numbers as the exchange writes them -----------------------------------------------
def shortest(x: float) -> str:
    """The shortest positional text that reads back as exactly `x`."""
    return np.format_float_positional(x, trim="-")


def decimals(values: list[float]) -> int:
    """The most decimals any of `values` needs (a symbol's precision, as recorded)."""
    most = 0
    for x in values:
        text = shortest(x)
        dot = text.find(".")
        if dot >= 0:
            most = max(most, len(text) - dot - 1)
    return most


EXACT_BELOW = 2 ** 52  # a p-decimal text of at most this many units of 10^-p is the only one reading as its double


def number(x: float, places: int) -> str:
    """`x` with `places` decimals (a symbol's own), or its shortest exact text if those
    would read back as another double."""
    if x == 0:
        x = 0.0  # not "-0.0..."
    if x >= 0 and places <= 15 and round(x * 10.0 ** places) < EXACT_BELOW:
        text = "%.*f" % (places, x)
        if float(text) == x:
            return text
    return shortest(x)


def levels_text(prices: list[float], sizes: list[float], price_places: int, size_places: int) -> str:
    """One side's levels as Binance writes them: `["0.35130000","6195.00000000"],...`."""
    return ",".join(['["%s","%s"]' % (number(p, price_places), number(s, size_places))
                     for p, s in zip(prices, sizes, strict=True)])


def levels_texts(prices: pa.Array, sizes: pa.Array, price_places: np.ndarray, size_places: np.ndarray) -> pa.Array:
    """`levels_text` of every row of two list columns (decimals per row), as a string
    array; written out for speed. Formatting level by level in Python, then with Arrow's
    string kernels, was most of the replay's time (BENCHMARKS.md, Replay): here every
    level is a row of a byte matrix (`,["` price `","` size `"]`), digits filled in by
    numpy, and the bytes a mask keeps are the rows' texts end to end. A row holding a
    value that is not exact with its decimals is written by `levels_text` instead.
    tests/test_replay.py holds it to `levels_text` for any levels and decimals."""
    lengths = pc.list_value_length(prices).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    px = prices.flatten().to_numpy(zero_copy_only=False)
    sx = sizes.flatten().to_numpy(zero_copy_only=False)
    first = np.zeros(len(px), dtype=bool)
    first[starts[:-1][lengths > 0]] = True
    chunks, level_bytes, exact = [], [], np.ones(len(px), dtype=bool)
    matrix, keep = np.empty((_CHUNK, 72), dtype=np.uint8), np.empty((_CHUNK, 72), dtype=bool)
    matrix[:, 0:3], matrix[:, 35:38], matrix[:, 70:72] = _OPEN, _MIDDLE, _CLOSE
    keep[:, 1:3] = keep[:, 35:38] = keep[:, 70:72] = True
    for lo in range(0, len(px), _CHUNK):
        hi = min(len(px), lo + _CHUNK)
        n = hi - lo
        m, k = matrix[:n], keep[:n]
        p_exact = _digits(px[lo:hi], price_places[row_of[lo:hi]], m[:, 3:35], k[:, 3:35])
        s_exact = _digits(sx[lo:hi], size_places[row_of[lo:hi]], m[:, 38:70], k[:, 38:70])
        k[:, 0] = ~first[lo:hi]  # the comma before every level but a row's first
        chunks.append(m[k])
        level_bytes.append(np.count_nonzero(k, axis=1))
        exact[lo:hi] = p_exact & s_exact
    data = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint8)
    ends = np.concatenate([[0], np.cumsum(np.concatenate(level_bytes))]) if level_bytes else np.zeros(1, np.int64)
    offsets = ends[starts].astype(np.int64)
    out = pa.Array.from_buffers(pa.large_string(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    if not exact.all():  # rows with a value the decimals would change: written one by one
        texts = out.to_pylist()
        for r in np.unique(row_of[~exact]).tolist():
            a, b = int(starts[r]), int(starts[r + 1])
            texts[r] = levels_text(px[a:b].tolist(), sx[a:b].tolist(), int(price_places[r]), int(size_places[r]))
        out = pa.array(texts, pa.large_string())
    return out


_CHUNK = 65_536  # levels a byte matrix at a time (~3 MB)
_OPEN, _MIDDLE, _CLOSE = (np.frombuffer(t, dtype=np.uint8) for t in (b',["', b'","', b'"]'))
_DIGIT = np.arange(16)[None, :]


def _digits(x: np.ndarray, places: np.ndarray, out: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each value as `number` writes it when exact, into `out` (n x 32 bytes: 16 digits,
    each followed by a place for the point) and `keep` (which of them to keep); returns
    which values are exact that way. The count of 10^-places units plus 10^16 is cast to text by Arrow (17
    digits each, so the bytes lie as a matrix); the point is kept after the last whole
    digit, and the whole part's leading zeros are dropped."""
    places = places.astype(np.int64)
    capped = np.minimum(places, 15)
    scale = 10.0 ** capped
    with np.errstate(invalid="ignore", over="ignore"):
        units = np.rint(x * scale)
        exact = (x >= 0) & (places <= 15) & (units < EXACT_BELOW) & (units / scale == x)
    count = np.where(exact, units, 0).astype(np.int64)
    text = pc.cast(pa.array(count + 10 ** 16), pa.string())  # "1" and 16 digits, zero-padded
    digits = np.frombuffer(text.buffers()[2], dtype=np.uint8, count=17 * len(x)).reshape(len(x), 17)[:, 1:]
    last_whole = (15 - capped)[:, None]
    nonzero = digits != ord("0")
    first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), 15)[:, None]
    out[:, 0::2] = digits
    out[:, 1::2] = ord(".")
    keep[:, 0::2] = _DIGIT >= np.minimum(first, last_whole)
    keep[:, 1::2] = (_DIGIT == last_whole) & (capped > 0)[:, None]
    return exact


# ---- the replay ---------------------------------------------------------------------------
@dataclass
class Pacing:
    """How late frames left against their schedule (speed > 0), as a histogram."""

    bins: np.ndarray = field(default_factory=lambda: np.zeros(1_000_001, dtype=np.int64))
    frames: int = 0

    def add(self, late_us: float, n: int) -> None:
        self.bins[min(len(self.bins) - 1, max(0, int(late_us) // LATE_BIN_US))] += n
        self.frames += n

    def quantile(self, q: float) -> float:
        """µs (to the bin's upper edge)."""
        if not self.frames:
            return 0.0
        at = int(np.searchsorted(np.cumsum(self.bins), q * self.frames, side="left"))
        return float((at + 1) * LATE_BIN_US)


class Replay:
    """The driver: walks the merged day, keeps the latest snapshot of each symbol, and
    sends each frame to the streams subscribed to it on its market's server."""

    def __init__(self, day: Day, day_name: str, speed: float, start_delay: float = 0.0,
                 slices: Slices | None = None, symbols: dict[str, set[str]] | None = None):
        """`day`: the day's first slice (or the whole day, put in order); `slices` gives the
        ones after it; `symbols`: each market's, of the whole selection (default: `day`'s)."""
        self.day, self.day_name, self.speed, self.start_delay = day, day_name, speed, start_delay
        self.slices = slices
        self._symbols = symbols if symbols is not None else day.symbols
        self._decimals: dict[tuple[str, str], tuple[int, int]] = {}
        self.sims: dict[str, DayServer] = {}  # by server: a market's name, or "spot-sbe"
        self.t0 = day.first_time or 0
        self.started: float | None = None       # monotonic time of the replay clock's start
        self.clock_us = self.t0                 # at speed 0: the last row's time
        self.books = Books()
        self.sent = 0
        self.pacing = Pacing()
        self._index: dict[str, dict[tuple[str, str], list[Stream]]] = {}
        self._indexed: dict[str, int] = {}

    # the server side asks these (DayServer)
    def now_us(self) -> int:
        if self.started is None or self.speed == 0:
            return self.clock_us
        return self.t0 + max(0, int((time.monotonic() - self.started) * self.speed * 1e6))

    def server_time_ms(self) -> int:
        return self.now_us() // 1000

    def decimals(self, market: Market, symbol: str) -> tuple[int, int]:
        """The decimals the symbol's recorded prices and sizes need (its tick and step
        size, as exchangeInfo tells them), from its first snapshot of the selection (a
        value may need fewer than the tick; none needs more); 8 and 8 without one."""
        key = (market.name, symbol)
        if key not in self._decimals:
            first = self.day.first_snapshot.get(key)
            self._decimals[key] = _places(_row(first, 0)) if first is not None else (8, 8)
        return self._decimals[key]

    def symbols(self, market: str) -> list[str]:
        return sorted(self._symbols.get(market, ()))

    def snapshot(self, market: Market, symbol: str, limit: int) -> bytes | None:
        """REST depth: the symbol's book at the replay clock (`serve.books`), `limit` levels
        a side at most; before the clock reaches its first snapshot, that snapshot."""
        book = self.books.of(market, symbol)
        first = self.day.first_snapshot.get((market.name, symbol))
        a = book.answer(limit)
        if a is None:  # no whole book: the first snapshot the stream joins, until the clock passes it
            if first is not None and (book.snapshot is None or first.column("received_time")[0].as_py() >= self.now_us()):
                a = Snapshot(first).answer(limit)
            elif book.snapshot is not None:  # after a recorded gap: the latest snapshot, as recorded
                a = book.snapshot.answer(limit)
            else:
                return None
        pp, sp = self.day.places_of(market, symbol)
        head = '{"lastUpdateId":%d,' % a.last_update_id
        if market.futures_payloads:
            head += '"E":%d,"T":%d,' % (a.event_time // 1000, a.transaction_time // 1000)  # ms
        if market is DELIVERY:
            head += '"symbol":"%s","pair":"%s",' % (symbol, symbol.split("_")[0])
        bids = levels_text(a.bid_prices, a.bid_sizes, pp, sp)
        asks = levels_text(a.ask_prices, a.ask_sizes, pp, sp)
        return (head + '"bids":[' + bids + '],"asks":[' + asks + "]}").encode()

    # ---- the walk ------------------------------------------------------------------------
    async def run(self) -> None:
        day: Day | None = self.day
        rows = self._rows(self.day)
        first = None
        for n, row in enumerate(rows):  # before --from: applied to the books at once, not sent
            if self.day.selection.sends(row[4]):
                first = row
                break
            self._to_book(*row[:4])
            if n % 10_000 == 0:
                await asyncio.sleep(0)  # REST and pings meanwhile
        while not any(c.streams for sim in self.sims.values() for c in sim.conns):
            await asyncio.sleep(0.01)
        log.info("a client subscribed; the clock starts in %.1fs at %s", self.start_delay,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.t0 / 1e6)))
        await asyncio.sleep(self.start_delay)
        self.started = time.monotonic()
        began = time.monotonic()
        pending: dict[Conn, list[bytes]] = {}
        due_of: list[tuple[float, int]] = []  # (due monotonic time, frames) of what is pending
        queued, held_since = 0, 0.0
        rows = itertools.chain([first] if first else [], rows)
        while day is not None:
            for market, kind, cols, i, t in rows:
                if self.speed > 0:
                    due = self.started + (t - self.t0) / self.speed / 1e6
                    if due > time.monotonic() + EARLY:
                        self._flush(pending, due_of)
                        queued = 0
                        await asyncio.sleep(due - time.monotonic())
                else:
                    due = 0.0
                self.clock_us = t
                self._to_book(market, kind, cols, i)
                if kind == SNAPSHOTS:
                    continue
                n = self._frame(market, kind, cols, i, pending)
                if n:
                    if not queued:
                        held_since = time.monotonic()
                    due_of.append((due, n))
                    queued += n
                if queued >= FLUSH_FRAMES or (due and queued and time.monotonic() - held_since >= FLUSH_HOLD):
                    self._flush(pending, due_of)
                    queued = 0
                    await self._drain()
            self._flush(pending, due_of)
            queued = 0
            day = await self.slices.next() if self.slices is not None else None
            if day is not None:
                rows = self._rows(day)
        took = time.monotonic() - began
        pace = (f"; pacing: late p50 {self.pacing.quantile(0.5) / 1000:.2f} ms, p99 "
                f"{self.pacing.quantile(0.99) / 1000:.2f} ms, max {self.pacing.quantile(1.0) / 1000:.2f} ms"
                if self.speed > 0 else "")
        log.info("day %s done: %d frames sent in %.1fs (%.0f frames/s)%s", self.day_name, self.sent, took,
                 self.sent / max(took, 1e-9), pace)

    def _rows(self, day: Day) -> Iterator[tuple[Market, str, dict, int, int]]:
        """Every row of a slice of the day in time order: (market, kind, its piece's
        columns, its index there, received_time)."""
        for pieces in merged(day.runs):
            for source, cols, rows, times in self._ordered(day, pieces):
                market, kind = day.sources[source]
                for i in rows:
                    yield market, kind, cols, i, int(times[i])

    def _to_book(self, market: Market, kind: str, cols: dict, i: int) -> None:
        """A snapshot or diff row to its symbol's book (REST depth answers from it)."""
        if kind == SNAPSHOTS:
            self.books.of(market, cols["symbol"][i]).on_snapshot(Snapshot(cols["_row"][i]))
        elif kind == DIFF:
            self.books.of(market, cols["symbol"][i]).on_diff(Diff(
                cols["first_update_id"][i], cols["final_update_id"][i], cols["prev_final_update_id"][i],
                cols["bids"][i], cols["asks"][i], cols["event_time"][i] or 0, cols["transaction_time"][i] or 0))

    def _ordered(self, day: Day, pieces: list[Piece]) -> Iterator[tuple[int, dict, list[int], np.ndarray]]:
        """A round's rows in time order (update id within a time), as runs of rows of one
        piece: (source, columns as Python lists, row indices, times)."""
        times = np.concatenate([p.times for p in pieces])
        ids = np.concatenate([p.table.column(ID[day.sources[p.source][1]]).to_numpy() for p in pieces])
        which = np.concatenate([np.full(len(p.times), k) for k, p in enumerate(pieces)])
        rows = np.concatenate([np.arange(len(p.times)) for p in pieces])
        order = np.lexsort((ids, times))
        which, rows = which[order], rows[order]
        columns = [self._columns(day, p) for p in pieces]
        bounds = np.flatnonzero(np.diff(which)) + 1
        for seg in np.split(np.arange(len(order)), bounds):
            k = int(which[seg[0]])
            yield pieces[k].source, columns[k], rows[seg].tolist(), pieces[k].times

    def _columns(self, day: Day, piece: Piece) -> dict:
        """A piece's columns as Python lists (depth rows' levels are text already)."""
        kind = day.sources[piece.source][1]
        t = piece.table
        if kind == SNAPSHOTS:  # kept as one-row tables (copies, so that the run's row group can go)
            return {"symbol": t.column("symbol").to_pylist(), "_row": _RowTaker(t)}
        return {name: t.column(name).to_pylist() for name in
                ("event_time", "symbol", "first_update_id", "final_update_id", "prev_final_update_id",
                 "transaction_time", "bids", "asks", "levels")}

    def _streams(self, server: str) -> dict[tuple[str, str], list[Stream]]:
        """(symbol, kind) -> the server's streams of it (rebuilt when streams are added)."""
        sim = self.sims[server]
        if self._indexed.get(server) != len(sim.streams):
            index: dict[tuple[str, str], list[Stream]] = {}
            for s in sim.streams.values():
                index.setdefault((s.symbol, DIFF if s.kind == "diff" else PARTIAL), []).append(s)
            self._index[server], self._indexed[server] = index, len(sim.streams)
        return self._index[server]

    def _frame(self, market: Market, kind: str, c: dict, i: int, pending: dict[Conn, list[bytes]]) -> int:
        """Row i as a frame to every subscriber of its symbol's streams of that kind;
        the frames queued."""
        queued = 0
        for server, sim in self.sims.items():
            if sim.market is market:
                queued += (self._sbe_frame if sim.sbe else self._json_frame)(server, market, kind, c, i, pending)
        return queued

    def _json_frame(self, server: str, market: Market, kind: str, c: dict, i: int,
                    pending: dict[Conn, list[bytes]]) -> int:
        symbol = c["symbol"][i]
        streams = [s for s in self._streams(server).get((symbol, kind), ()) if s.subscribers]
        if not streams:
            return 0
        queued = 0
        rendered: dict[tuple[int, bool], bytes] = {}
        for s in streams:
            cut = s.levels if kind == PARTIAL else 0
            wrapped: dict[bool, bytes] = {}
            for conn in s.subscribers:
                if conn.ws.closed or conn.transport is None or conn.transport.is_closing():
                    continue
                payload = rendered.get((cut, conn.micro))
                if payload is None:
                    payload = rendered[(cut, conn.micro)] = self._payload(market, kind, c, i, cut, conn.micro)
                if conn.combined:
                    if conn.micro not in wrapped:
                        wrapped[conn.micro] = ws_frame(b'{"stream":"' + s.name.encode() + b'","data":' + payload + b"}")
                    pending.setdefault(conn, []).append(wrapped[conn.micro])
                else:
                    pending.setdefault(conn, []).append(ws_frame(payload))
                queued += 1
        return queued

    def _sbe_frame(self, server: str, market: Market, kind: str, c: dict, i: int,
                   pending: dict[Conn, list[bytes]]) -> int:
        """Row i as one binary SBE message (`serve.sbe`) to every subscriber of its stream
        (`<symbol>@depth` or `@depth20`; no stream wrapper, raw and combined alike)."""
        symbol = c["symbol"][i]
        conns = [conn for s in self._streams(server).get((symbol, kind), ()) for conn in s.subscribers
                 if not conn.ws.closed and conn.transport is not None and not conn.transport.is_closing()]
        if not conns:
            return 0
        cut = 20 if kind == PARTIAL else 0
        bids = orjson.loads("[" + c["bids"][i] + "]")[:cut or None]
        asks = orjson.loads("[" + c["asks"][i] + "]")[:cut or None]
        pe, qe, levels = sbe.mantissas(bids + asks)
        b, a = levels[:len(bids)], levels[len(bids):]
        event = c["event_time"][i] or 0  # a spot JSON partial frame had none
        if kind == DIFF:
            payload = sbe.diff(event, c["first_update_id"][i], c["final_update_id"][i], pe, qe, b, a, symbol)
        else:
            payload = sbe.depth(event, c["final_update_id"][i], pe, qe, b, a, symbol)
        frame = ws_frame(payload, binary=True)
        for conn in conns:
            pending.setdefault(conn, []).append(frame)
        return len(conns)

    def _payload(self, market: Market, kind: str, c: dict, i: int, cut: int, micro: bool = False) -> bytes:
        """Row i as Binance's payload; `cut`: a partial stream's levels (0: all recorded);
        times in ms, or in µs for a spot client that asked (`timeUnit=MICROSECOND`)."""
        b, a = c["bids"][i], c["asks"][i]
        if cut and c["levels"][i] > cut:  # a depth5 stream of a depth20 record: the top levels
            b = orjson.dumps(orjson.loads("[" + b + "]")[:cut]).decode()[1:-1]
            a = orjson.dumps(orjson.loads("[" + a + "]")[:cut]).decode()[1:-1]
        symbol = c["symbol"][i]
        if market.futures_payloads:
            ps = ',"ps":"%s"' % symbol.split("_")[0] if market is DELIVERY else ""
            text = ('{"e":"depthUpdate","E":%d,"T":%d,"s":"%s"%s,"U":%d,"u":%d,"pu":%d,"b":[%s],"a":[%s]}'
                    % (c["event_time"][i] // 1000, c["transaction_time"][i] // 1000, symbol, ps, c["first_update_id"][i],
                       c["final_update_id"][i], c["prev_final_update_id"][i], b, a))
        elif kind == DIFF:
            text = ('{"e":"depthUpdate","E":%d,"s":"%s","U":%d,"u":%d,"b":[%s],"a":[%s]}'
                    % (c["event_time"][i] if micro else c["event_time"][i] // 1000, symbol, c["first_update_id"][i],
                       c["final_update_id"][i], b, a))
        else:
            text = '{"lastUpdateId":%d,"bids":[%s],"asks":[%s]}' % (c["final_update_id"][i], b, a)
        return text.encode()

    def _flush(self, pending: dict[Conn, list[bytes]], due_of: list[tuple[float, int]]) -> None:
        """One write per connection of everything queued."""
        now = time.monotonic()
        for conn, frames in pending.items():
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.write(b"".join(frames))
                self.sent += len(frames)
        if self.speed > 0:
            for due, n in due_of:
                self.pacing.add((now - due) * 1e6, n)
        pending.clear()
        due_of.clear()

    async def _drain(self) -> None:
        """Let the loop run (pings, control messages, REST), and wait while a client has
        more than HIGH_WATER bytes it has not read."""
        await asyncio.sleep(0)
        while any(c.transport is not None and not c.transport.is_closing()
                  and c.transport.get_write_buffer_size() > HIGH_WATER
                  for sim in self.sims.values() for c in sim.conns):
            await asyncio.sleep(0.001)


def _row(table: pa.Table, i: int) -> dict:
    return table.slice(i, 1).to_pylist()[0]


class _RowTaker:
    """row i of a table as a one-row copy (`table.take`), made only when asked."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __getitem__(self, i: int) -> pa.Table:
        return self.table.take([i])


class DayServer(ExchangeServer):
    """One market of the replayed day: the driver sends its frames; REST depth and the time
    endpoint answer from the replay clock."""

    def __init__(self, market: str, replay: Replay, sbe: bool = False):
        super().__init__(market, symbols=replay.symbols(market))
        self.replay = replay
        self.sbe = sbe  # spot as SBE binary streams (X-MBX-APIKEY required, any value)

    def depth_body(self, symbol: str, limit: int) -> bytes | None:
        return self.replay.snapshot(self.market, symbol, limit)

    def decimals(self, symbol: str) -> tuple[int, int]:
        return self.replay.decimals(self.market, symbol)

    def server_time_ms(self) -> int:
        return self.replay.server_time_ms()


# ---- the command ---------------------------------------------------------------------------
async def serve(data: Source, day: str, ports: dict[str, int], host: str, speed: float, start_delay: float,
                scratch: Path | None, stop: asyncio.Event, ready: asyncio.Event | None = None,
                sbe_port: int | None = None, selection: Selection = Selection()) -> int:
    """Order the day (what `selection` keeps of it), serve it on `ports` (market -> port;
    0 picks one) until `stop`; with `sbe_port`, the spot day also as SBE binary streams there."""
    markets = [MARKETS[m] for m in ports]
    began = time.monotonic()
    for m in MARKETS.values():
        if m.name not in ports and data.files(m.name, DIFF, day):
            log.warning("%s recorded on %s but not served (no --%s-port)", m.name, day, m.name)
    with tempfile.TemporaryDirectory(prefix="replay-", dir=scratch) as tmp:
        plan = await asyncio.to_thread(plan_day, data, day, markets, selection)
        found = set().union(*plan.symbols.values())
        if selection.symbols is not None and (missing := selection.symbols - found):
            log.error("not recorded on %s under %s (in the markets served, in the hours asked): %s", day, data.name,
                      ", ".join(sorted(missing)))
            return 2
        if plan.first_us is None:
            log.error("nothing recorded on %s under %s%s", day, data.name, "" if selection == Selection()
                      else " in the symbols and hours asked")
            return 2
        slices = Slices(data, day, markets, Path(tmp), selection, plan)
        ordered = await slices.next()
        assert ordered is not None
        log.info("day %s of %s: %d slices to put in order, the first ordered in %.1fs: %s; symbols: %s", day, data.name,
                 len(slices.windows), time.monotonic() - began,
                 ", ".join(f"{k}={v}" for k, v in sorted(ordered.rows.items())),
                 ", ".join(f"{m}={len(s)}" for m, s in plan.symbols.items() if s))
        replay = Replay(ordered, day, speed, start_delay, slices, plan.symbols)
        servers = [(m.name, m.name, ports[m.name], False) for m in markets]
        if sbe_port is not None:
            servers.append(("spot-sbe", "spot", sbe_port, True))
        for server, market_name, port, as_sbe in servers:
            sim = DayServer(market_name, replay, sbe=as_sbe)
            await sim.start(host, port)
            replay.sims[server] = sim
            log.info("replay market=%s ws_url=%s rest_url=%s (%d symbols)", server, sim.ws_url, sim.rest_url,
                     len(sim.symbols))
        if ready is not None:
            ready.set()
        driver = asyncio.create_task(replay.run())
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([driver, waiter], return_when=asyncio.FIRST_COMPLETED)
        if driver.done() and driver.exception() is not None:
            raise driver.exception()  # type: ignore[misc]
        await waiter
        driver.cancel()
        for sim in replay.sims.values():
            await sim.stop()
    return 0
