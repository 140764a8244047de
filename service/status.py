"""A state file the running collector rewrites every few seconds (data_dir/.status.json;
`.status-<market>.json` for a process that records one market), and `collector.py
status`, which prints them for a human."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from service.counters import CountedPipeline, SupervisorView, UploadProgress

STATE_FILE = ".status.json"


def snapshot(pipelines: Sequence[CountedPipeline], upload_job: UploadProgress | None, rates: dict[str, float],
             now_us: int, supervisor: SupervisorView | None = None) -> dict[str, Any]:
    markets = {}
    for p in pipelines:
        c = p.counters()
        markets[c.market] = {
            "symbols": c.symbols,
            "streams_live": c.streams_live,  # a batch's streams are live while one of its connections delivers
            "streams": c.streams,
            "connections_live": c.connections_live,
            "connections": c.connections,
            "degraded": list(c.degraded),
            "relay_fallback": c.relay_fallback,  # connections reading their own socket (their relay was down)
            "msgs_per_s": rates.get(c.market, 0.0),
            "gaps": dict(c.gaps_by_reason),
            "coverage_today": c.coverage,  # covered over recorded time so far today (None: nothing yet)
            "last_snapshot_age_s": round((now_us - c.last_snapshot_us) / 1e6, 1) if c.last_snapshot_us else None,
            "queue": c.queue,
            "rows_written": sum(c.rows_written.values()),
            "write_errors": c.write_errors,
        }
    shard = pipelines[0].cfg.shard if pipelines else (1, 1)
    up, relays = supervisor.helpers_up() if supervisor is not None else (0, 0)
    return {"pid": os.getpid(), "time": time.time(), "markets": markets, "shard": f"{shard[0]}/{shard[1]}",
            "relays": {"up": up, "configured": relays},
            "restarts": supervisor.restarts() if supervisor is not None else {},
            "last_upload": upload_job.last if upload_job is not None else None}


def name_for(market: str | None) -> str:
    """The state file of a process recording every market, or only `market`."""
    return STATE_FILE if market is None else f".status-{market}.json"


def write(data_dir: Path, state: dict, name: str = STATE_FILE) -> None:
    tmp = data_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, data_dir / name)


def disk_used(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def render(data_dir: Path, now: float | None = None) -> tuple[str, bool]:
    """(text, running) from every state file (one per collector process); running only
    if every process that wrote one is."""
    paths = sorted(data_dir.glob(".status*.json")) or [data_dir / STATE_FILE]
    parts = [_render_one(data_dir, path, now) for path in paths]
    return "\n".join(text for text, _ in parts), all(running for _, running in parts)


def _render_one(data_dir: Path, path: Path, now: float | None) -> tuple[str, bool]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"no status at {path}: the collector has not run with this data_dir", False
    now = time.time() if now is None else now
    age = now - state["time"]
    running = age < 30
    lines = [f"collector pid {state['pid']}" + (f" (shard {state['shard']})" if state.get("shard", "1/1") != "1/1" else "")
             + ": " + ("running" if running else f"NOT RUNNING (last seen {age:.0f}s ago)"),
             f"data_dir {data_dir}: {disk_used(data_dir) / 2**30:.2f} GiB"]
    relays = state.get("relays") or {}
    if relays.get("configured"):
        lines.append(f"stamp relays {relays['up']}/{relays['configured']} up")
    if state.get("restarts"):
        lines.append("restarted: " + ", ".join(f"{k} x{v}" for k, v in sorted(state["restarts"].items())))
    for name, m in state["markets"].items():
        snap = "never" if m["last_snapshot_age_s"] is None else f"{m['last_snapshot_age_s']:.0f}s ago"
        gaps = ", ".join(f"{k}={v}" for k, v in sorted(m["gaps"].items())) or "none"
        conns = f"connections {m['connections_live']}/{m['connections']}" if "connections" in m else ""
        if m.get("degraded"):
            conns += f" (degraded: {', '.join(m['degraded'])})"
        if m.get("relay_fallback"):
            conns += f" ({m['relay_fallback']} reading their own socket: stamp relay down)"
        coverage = m.get("coverage_today")
        cover = "-" if coverage is None else f"{coverage:.6f}"
        lines.append(f"{name:8} streams {m['streams_live']}/{m['streams']}  {conns}  {m['msgs_per_s']:.1f} msgs/s  "
                     f"gaps since start: {gaps}  coverage today {cover}  last snapshot {snap}  queue {m['queue']}  "
                     f"rows written {m['rows_written']}  write errors {m['write_errors']}")
    up = state.get("last_upload")
    if up is None:
        lines.append("upload: disabled")
    elif not up:
        lines.append("upload: no run yet")
    else:
        lines.append(f"upload: last run uploaded {up['uploaded']}, skipped {up['skipped']}, deleted {up['deleted']}, "
                     f"failing days: {', '.join(up['days_failed']) or 'none'}")
    return "\n".join(lines), running
