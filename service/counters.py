"""One market pipeline's counters at one moment, typed: the one thing the status line,
the Prometheus metrics, the state file behind `collector.py status` and systemd's
STATUS= read. `pipeline.MarketPipeline.counters()` takes it from the threads' own stats
(nothing is added to the per-message path)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from config import MarketConfig


@dataclass(frozen=True)
class Counters:
    market: str
    symbols: int
    streams: int                    # configured (two per symbol)
    streams_live: int               # in batches that have at least one connection delivering
    connections_live: int           # delivering data now
    connections: int                # configured: batches x ws_redundancy
    degraded: tuple[str, ...]       # "ws-spot-0:1/2" for each batch on fewer connections than configured
    batches: tuple[tuple[str, int, int], ...]          # (batch, connections live, configured)
    last_data_us: tuple[tuple[str, int], ...]          # (connection copy, its last data frame's stamp)
    connects: int                   # connections opened (reconnects and rotations included)
    rotations: int
    dead: int                       # replaced for delivering no data for ws_dead_after
    relay_fallback: int             # connections reading their own socket while their stamp relay is down
    last_attempt: float             # monotonic time of the last connection attempt
    frames: dict[str, int]          # data frames processed, by kind (copies included)
    gaps: int
    gaps_by_reason: dict[str, int]
    duplicates: int                 # frames dropped as already written
    malformed: int
    queue: int                      # frames waiting for the processor
    rows_written: dict[str, int]    # rows published in part files, by kind
    files: int
    bytes_written: int
    write_errors: int
    rows_lost: int
    pending_bytes: int              # segments the writer holds in memory, not yet on disk (it is behind, or failing)
    journal_bytes: int              # the journal on disk: grows while segments wait for the writer
    snapshot_rows: int              # snapshots the processor took in
    snapshots_ok: int
    snapshots_failed: int
    snapshots_rate_limited: int
    snapshot_latency_sum: float     # seconds, over snapshots_ok
    last_snapshot_us: int
    snapshot_interval: float        # seconds between two scheduled snapshots of a symbol (stretched to the budget)
    clock_synced: bool | None       # the kernel's view at the last clock sample (None: unknown)
    clock_offset_us: int | None     # local minus exchange time at the last sample
    clock_rtt_us: int | None
    clock_max_error_us: int | None
    weight_used: int
    weight_cap: int
    receive_delay: tuple[float, float] | None  # received_time - event_time of the latest diffs, p50 and p99 (s)
    coverage: float | None          # today's so far: covered over recorded time, every symbol (None: nothing yet)
    processor_heartbeat: float      # monotonic time of the loop's last turn
    writer_heartbeat: float

    @property
    def last_data(self) -> int:
        """The newest data frame's stamp over every connection (0 before the first)."""
        return max((us for _, us in self.last_data_us), default=0)


class CountedPipeline(Protocol):
    """What the service side reads of a market pipeline (`pipeline.MarketPipeline`), named
    here so that `service` need not import the pipeline that imports it."""

    @property
    def cfg(self) -> MarketConfig: ...

    @property
    def processor(self) -> threading.Thread: ...

    @property
    def writer(self) -> threading.Thread: ...

    def counters(self) -> Counters: ...



def status_line(c: Counters, last: dict[str, Any]) -> str:
    """One line: rates since the previous call (state kept in `last`), then totals."""
    counts = {**c.frames, "snap": c.snapshot_rows}
    now = time.monotonic()
    elapsed = max(1e-3, now - last.get("_t", now - 1e-3))
    rates = " ".join(f"{k.split('_')[0]}={(v - last.get(k, 0)) / elapsed:.1f}/s" for k, v in counts.items())
    last.update(counts, _t=now)
    return (f"status market={c.market} {rates} connections={c.connections_live}/{c.connections} "
            f"degraded={','.join(c.degraded) or 'none'} relay_fallback={c.relay_fallback} "
            f"snapshots_ok={c.snapshots_ok} snapshots_failed={c.snapshots_failed} "
            f"gaps={c.gaps} coverage={'-' if c.coverage is None else f'{c.coverage:.6f}'} "
            f"duplicates={c.duplicates} malformed={c.malformed} queue={c.queue} rows_written={sum(c.rows_written.values())} "
            f"files={c.files} write_errors={c.write_errors}")


class SupervisorView(Protocol):
    """What the service side reads of the supervisor (`service.supervisor.Supervisor`)."""

    def restarts(self) -> dict[str, int]: ...

    def helpers_up(self) -> tuple[int, int]: ...


class UploadProgress(Protocol):
    """What the service side reads of the upload job (`storage.upload_job.UploadJob`)."""

    @property
    def kick(self) -> threading.Event: ...

    @property
    def last(self) -> dict[str, Any]: ...

    @property
    def totals(self) -> dict[str, int]: ...

    @property
    def last_run(self) -> float: ...

    @property
    def last_success(self) -> float: ...


class CompactionProgress(Protocol):
    """What the metrics read of the compactor (`storage.compact.Compactor`)."""

    @property
    def runs(self) -> dict[str, int]: ...

    @property
    def failures(self) -> int: ...
