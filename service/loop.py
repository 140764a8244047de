"""The main thread's loop while recording: periodic jobs (status lines, state file, uploads),
systemd readiness, watchdog and status, and the check that no pipeline thread died."""
from __future__ import annotations

import logging
import time
from typing import Callable, Protocol, Sequence

import schedule

from config import Config
from service import status as state_file
from service.counters import CountedPipeline, SupervisorView, UploadProgress, status_line
from service.notify import Notifier

log = logging.getLogger("collector")

READY_AFTER_S = 60.0  # READY=1 even if some stream is not live yet (systemd must not kill a waiting start)


class Watched(SupervisorView, Protocol):
    """The supervisor as the main loop sees it: it also watches (`service.supervisor`)."""

    def watch(self) -> str | None: ...


class MainLoop:
    def __init__(self, pipelines: Sequence[CountedPipeline], cfg: Config, now_us: Callable[[], int],
                 supervisor: Watched, upload_job: UploadProgress | None = None, notifier: Notifier | None = None,
                 state_name: str = state_file.STATE_FILE):
        self.pipelines, self.cfg, self.now_us, self.upload_job = pipelines, cfg, now_us, upload_job
        self.supervisor = supervisor
        self.state_name = state_name
        self.notifier = notifier or Notifier()
        self.started = time.monotonic()
        self.ready = False
        self.last_watchdog = 0.0
        self.rate_state: dict[str, dict] = {p.cfg.name: {"_t": time.monotonic()} for p in pipelines}
        self.rates: dict[str, float] = {}
        self.last_counts: dict[str, tuple[float, int]] = {}
        self.jobs = schedule.Scheduler()
        c = cfg.collector
        # schedule takes a float interval; its annotation says int
        self.jobs.every(c.status_interval).seconds.do(self.log_status)  # type: ignore[arg-type]
        self.jobs.every(5).seconds.do(self.publish_state)
        if upload_job is not None:
            self.jobs.every(cfg.upload.every_minutes).minutes.do(upload_job.kick.set)

    def tick(self) -> str | None:
        """One turn (every 0.5 s); returns the names of threads that died (fatal), if any."""
        dead = self.supervisor.watch()
        if dead:
            return dead
        self.jobs.run_pending()
        if not self.ready and (self.live() or time.monotonic() - self.started > READY_AFTER_S):
            self.ready = True
            self.update_rates()
            self.notifier.ready(self.summary())
            log.info("ready: %s", self.summary())
        self.feed_watchdog()
        return None

    def live(self) -> bool:
        """Every configured connection delivers data."""
        return all(c.connections_live == c.connections for c in (p.counters() for p in self.pipelines))

    def healthy(self) -> tuple[bool, str]:
        """Really moving, not just alive: processor and writer loops turn, and frames arrive
        (or, during an outage, the supervisors are still trying to reconnect)."""
        now = time.monotonic()
        window = max(60.0, 4 * self.cfg.collector.ws_dead_after)
        for p in self.pipelines:
            c = p.counters()
            if now - c.processor_heartbeat > 15:
                return False, f"processor-{c.market} has not turned for {now - c.processor_heartbeat:.0f}s"
            if now - c.writer_heartbeat > 15:
                return False, f"writer-{c.market} has not turned for {now - c.writer_heartbeat:.0f}s"
            frame_age = (self.now_us() - c.last_data) / 1e6 if c.last_data else now - self.started
            attempt_age = now - c.last_attempt
            if frame_age > window and attempt_age > window:
                return False, f"{c.market}: no frame for {frame_age:.0f}s and no reconnect attempt"
        return True, ""

    def feed_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None or time.monotonic() - self.last_watchdog < interval:
            return
        ok, why = self.healthy()
        if ok:
            self.notifier.watchdog()
            self.last_watchdog = time.monotonic()
        else:
            log.error("watchdog withheld: %s", why)

    def update_rates(self) -> None:
        now = time.monotonic()
        for p in self.pipelines:
            c = p.counters()
            count = sum(c.frames.values())
            t0, c0 = self.last_counts.get(c.market, (self.started, 0))
            if now > t0:
                self.rates[c.market] = (count - c0) / (now - t0)
            self.last_counts[c.market] = (now, count)

    def summary(self) -> str:
        parts = []
        for c in (p.counters() for p in self.pipelines):
            state = " (degraded)" if c.degraded else ""
            parts.append(f"{c.market}: {c.connections_live}/{c.connections} connections{state}, "
                         f"{self.rates.get(c.market, 0):.0f} msgs/s, gaps {c.gaps}, queue {c.queue}")
        return "; ".join(parts)

    def log_status(self) -> None:
        for p in self.pipelines:
            log.info("%s", status_line(p.counters(), self.rate_state[p.cfg.name]))

    def publish_state(self) -> None:
        self.update_rates()
        self.notifier.status(self.summary())
        try:
            state_file.write(self.cfg.collector.data_dir,
                             state_file.snapshot(self.pipelines, self.upload_job, self.rates, self.now_us(),
                                                 self.supervisor),
                             self.state_name)
        except OSError as e:
            log.warning("cannot write the status file: %s", e)

    def stopping(self) -> None:
        self.notifier.stopping()

    def final_status(self) -> None:
        self.log_status()
