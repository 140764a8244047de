"""Prometheus metrics, read from the pipeline's own counters at scrape time (nothing is
added to the per-message path). Served on 127.0.0.1 by default (`metrics_listen`)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from service.counters import CompactionProgress, CountedPipeline, SupervisorView, UploadProgress

log = logging.getLogger(__name__)

COUNTED_GAP_REASONS = ("start", "sequence", "reconnect", "malformed")  # docs/data.md, gaps


class PipelineMetrics:
    """A prometheus_client collector over MarketPipeline objects (and the upload job)."""

    def __init__(self, pipelines: Sequence[CountedPipeline], upload_job: UploadProgress | None = None,
                 now_us: Callable[[], int] = lambda: time.time_ns() // 1000,
                 compactor: CompactionProgress | None = None, supervisor: SupervisorView | None = None,
                 data_dir: Path | None = None, clock_max_offset_ms: float | None = None):
        self.pipelines, self.upload_job, self.now_us, self.compactor = pipelines, upload_job, now_us, compactor
        self.supervisor, self.data_dir, self.clock_max_offset_ms = supervisor, data_dir, clock_max_offset_ms
        self.started = time.time()

    def collect(self) -> Iterator[Metric]:
        c = lambda name, doc, labels: CounterMetricFamily(f"obc_{name}", doc, labels=labels)  # noqa: E731
        g = lambda name, doc, labels: GaugeMetricFamily(f"obc_{name}", doc, labels=labels)  # noqa: E731
        frames = c("frames", "WebSocket data frames processed", ["market", "kind"])
        rows = c("rows_written", "rows published in part files", ["market", "kind"])
        gaps = c("gaps", "breaks in a symbol's diff stream", ["market", "reason"])
        dupes = c("duplicates", "frames dropped as already written: with ws_redundancy > 1, mostly the other "
                            "connections' copies", ["market"])
        malformed = c("malformed", "frames or snapshots refused as malformed", ["market"])
        connects = c("connections", "WebSocket connections opened (reconnects and rotations included)", ["market"])
        rotations = c("rotations", "make-before-break replacements", ["market"])
        snaps = c("snapshots", "REST snapshot requests by result", ["market", "result"])
        latency = SummaryMetricFamily("obc_snapshot_latency_seconds", "REST snapshot round trip", labels=["market"])
        weight = g("rest_weight_used", "request weight used this minute (ours or the server's count)", ["market"])
        weight_cap = g("rest_weight_cap", "request weight this collector allows itself per minute", ["market"])
        interval = g("snapshot_interval_seconds", "seconds between two scheduled snapshots of one symbol: "
                     "snapshot_interval, or longer when the symbols' snapshots would pass the weight budget", ["market"])
        clock_offset = g("clock_offset_seconds", "local clock minus the exchange's, at the last sample (once a "
                         "minute; uncertain by half the round trip)", ["market"])
        clock_rtt = g("clock_rtt_seconds", "round trip of the last exchange time request", ["market"])
        clock_synced = g("clock_synced", "1 if the kernel says the clock is synchronised (adjtimex)", ["market"])
        clock_error = g("clock_max_error_seconds", "the kernel's maximum error of the clock (adjtimex)", ["market"])
        symbols = g("symbols", "symbols recorded now (all / top N and listing checks change it)", ["market"])
        depth = g("queue_depth", "frames waiting for the processor", ["market"])
        written = c("bytes_written", "bytes of part files published", ["market"])
        errors = c("write_errors", "failed part-file writes (retried)", ["market"])
        lost = c("rows_lost", "rows dropped from memory past max_pending_mb", ["market"])
        age = g("last_frame_age_seconds", "seconds since the connection's last data frame", ["market", "connection"])
        batch_live = g("batch_connections", "connections of the batch delivering data now", ["market", "batch"])
        batch_want = g("batch_connections_configured", "connections configured per batch (ws_redundancy)",
                       ["market", "batch"])
        degraded = g("batches_degraded", "batches running on fewer connections than configured", ["market"])
        dead = c("connections_dead", "connections replaced for delivering no data for ws_dead_after", ["market"])
        delay = g("receive_delay_seconds", "received_time - event_time of the latest diffs (the exchange's engine to "
                  "this host's kernel, plus the clocks' difference)", ["market", "quantile"])
        pending = g("writer_pending_bytes", "segments the writer holds in memory, not yet on disk", ["market"])
        journal = g("journal_bytes", "the write-ahead journal on disk: it grows while segments wait for the writer",
                    ["market"])
        coverage = g("coverage_ratio", "today so far: the share of the recorded time with an unbroken diff chain, "
                      "every symbol together (the day's quality record, made at compaction, is exact)", ["market"])
        fallback = g("relay_fallback_connections", "connections reading their own socket because their stamp relay "
                     "was down when they connected (they move back once it is up)", ["market"])
        now = self.now_us()
        for p in self.pipelines:
            k = p.counters()
            m = k.market
            for kind, n in k.frames.items():
                frames.add_metric([m, kind], n)
            for kind, n in k.rows_written.items():
                rows.add_metric([m, kind], n)
            # the reasons an alert or a dashboard counts are there from the start, at 0: a
            # counter that first appears at 1 shows no increase in Prometheus
            for reason, n in {**dict.fromkeys(COUNTED_GAP_REASONS, 0), **k.gaps_by_reason}.items():
                gaps.add_metric([m, reason], n)
            dupes.add_metric([m], k.duplicates)
            malformed.add_metric([m], k.malformed)
            connects.add_metric([m], k.connects)
            rotations.add_metric([m], k.rotations)
            for result, n in (("ok", k.snapshots_ok), ("failed", k.snapshots_failed),
                              ("rate_limited", k.snapshots_rate_limited)):
                snaps.add_metric([m, result], n)
            latency.add_metric([m], k.snapshots_ok, k.snapshot_latency_sum)
            weight.add_metric([m], k.weight_used)
            weight_cap.add_metric([m], k.weight_cap)
            interval.add_metric([m], k.snapshot_interval)
            symbols.add_metric([m], k.symbols)
            if k.clock_offset_us is not None:
                clock_offset.add_metric([m], k.clock_offset_us / 1e6)
                clock_rtt.add_metric([m], (k.clock_rtt_us or 0) / 1e6)
            if k.clock_synced is not None:
                clock_synced.add_metric([m], int(k.clock_synced))
            if k.clock_max_error_us is not None:
                clock_error.add_metric([m], k.clock_max_error_us / 1e6)
            depth.add_metric([m], k.queue)
            written.add_metric([m], k.bytes_written)
            errors.add_metric([m], k.write_errors)
            lost.add_metric([m], k.rows_lost)
            for connection, us in k.last_data_us:
                if us:
                    age.add_metric([m, connection], max(0.0, (now - us) / 1e6))
            for batch, live, configured in k.batches:
                batch_live.add_metric([m, batch], live)
                batch_want.add_metric([m, batch], configured)
            degraded.add_metric([m], len(k.degraded))
            dead.add_metric([m], k.dead)
            fallback.add_metric([m], k.relay_fallback)
            pending.add_metric([m], k.pending_bytes)
            if k.receive_delay is not None:
                delay.add_metric([m, "0.5"], k.receive_delay[0])
                delay.add_metric([m, "0.99"], k.receive_delay[1])
            journal.add_metric([m], k.journal_bytes)
            if k.coverage is not None:
                coverage.add_metric([m], k.coverage)
        if self.pipelines:
            i, n = self.pipelines[0].cfg.shard
            shard = g("shard", "this host records shard i of n of every market's symbols (shard = i/n)", ["shard"])
            shard.add_metric([f"{i}/{n}"], 1)
            yield shard
        yield from (frames, rows, gaps, dupes, malformed, connects, rotations, snaps, latency, weight, weight_cap,
                    interval, symbols, clock_offset, clock_rtt, clock_synced, clock_error,
                    depth, written, errors, lost, age, batch_live, batch_want, degraded, dead, fallback, coverage,
                    pending, journal, delay)
        started = g("start_time_seconds", "when this collector process started (unix time)", [])
        started.add_metric([], self.started)
        yield started
        if self.clock_max_offset_ms is not None:
            bound = g("clock_max_offset_seconds", "clock_max_offset_ms: how far the local clock may be off the "
                      "exchange's before it is a warning", [])
            bound.add_metric([], self.clock_max_offset_ms / 1000)
            yield bound
        if self.data_dir is not None:
            try:
                fs = os.statvfs(self.data_dir)
            except OSError:
                pass  # the folder is gone: the writers say so in their own way
            else:
                free = g("disk_free_bytes", "bytes free for the collector on data_dir's filesystem", [])
                free.add_metric([], fs.f_bavail * fs.f_frsize)
                size = g("disk_size_bytes", "size of data_dir's filesystem", [])
                size.add_metric([], fs.f_blocks * fs.f_frsize)
                yield free
                yield size
        if self.supervisor is not None:
            running, configured = self.supervisor.helpers_up()
            relays_up = g("relays_up", "stamp relay processes running", [])
            relays_up.add_metric([], running)
            relays = g("relays_configured", "stamp relay processes configured (ws_redundancy, or 0)", [])
            relays.add_metric([], configured)
            restarted = c("restarts", "threads and helper processes restarted after they died", ["name"])
            for name, n in sorted(self.supervisor.restarts().items()):
                restarted.add_metric([name], n)
            yield from (relays_up, relays, restarted)
        if self.upload_job is not None:
            up = c("upload_files", "day files handled by upload runs, by result", ["result"])
            for result in ("uploaded", "skipped", "deleted"):
                up.add_metric([result], self.upload_job.totals.get(result, 0))
            failing = g("upload_days_failing", "days the last upload run could not upload", [])
            failing.add_metric([], len(self.upload_job.last.get("days_failed", [])))
            last_run = g("upload_last_run_timestamp_seconds", "when the last upload run ended (0: none yet)", [])
            last_run.add_metric([], self.upload_job.last_run)
            success = g("upload_last_success_timestamp_seconds", "when the last upload run that uploaded every "
                        "finished day ended (0: none yet)", [])
            success.add_metric([], self.upload_job.last_success)
            yield from (up, failing, last_run, success)
        if self.compactor is not None:
            runs = c("compactions", "compaction child processes, by outcome", ["result"])
            for result, n in self.compactor.runs.items():
                runs.add_metric([result], n)
            failing = g("compaction_failing", "compaction runs failed in a row (0: the last one worked)", [])
            failing.add_metric([], self.compactor.failures)
            yield runs
            yield failing


def serve(listen: str, pipelines: Sequence[CountedPipeline], upload_job: UploadProgress | None = None,
          compactor: CompactionProgress | None = None, supervisor: SupervisorView | None = None,
          data_dir: Path | None = None, clock_max_offset_ms: float | None = None) -> int:
    """Start the HTTP endpoint on host:port; returns the port (0 picks a free one)."""
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    registry.register(PipelineMetrics(pipelines, upload_job, compactor=compactor, supervisor=supervisor,
                                      data_dir=data_dir, clock_max_offset_ms=clock_max_offset_ms))
    server, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", bound)
    return bound
