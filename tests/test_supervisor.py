"""Every thread has one outcome when it dies of an exception (service/threads.py, decided
beside each thread's class), and the supervisor starts and stops them in one order
(service/supervisor.py). Each thread is made to raise once, in a real pipeline recording
from the simulator over real sockets: a RESTART thread is restarted (a log line, a counter)
and its work goes on; a FATAL one stops the collector with exit status 1."""
from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
import requests

import collector
import config
from handlers.ingest import stamped
from handlers.ingest.inbox import WS, Inbox
from handlers.ingest.relay import StampRelay
from handlers.ingest.websocket import AttemptLimiter, BatchCopies, StreamBatch
from handlers.process.processor import FrameProcessor
from pipeline import build_market
from service.supervisor import STAGES, Supervisor
from service.threads import FATAL, RESTART, PipelineThread
from simulator import Simulator
from storage.compact import Compactor
from storage.upload_job import UploadJob
from storage.writer import PartWriter
from tests.helpers import market_section, wait_until, write_config

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def raise_once(obj: object, attr: str) -> list[int]:
    """`obj.attr` (a method or a callable attribute) raises on its first call, then works;
    returns the list its calls are counted in."""
    real = getattr(obj, attr)
    calls: list[int] = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"injected into {attr}")
        return real(*args, **kwargs)

    setattr(obj, attr, wrapped)
    return calls


def pipeline(tmp_path, sim, supervisor, stop, **section):
    path = write_config(tmp_path, [market_section("spot", sim.spot, SYMBOLS, **section)])
    cfg = config.load(path)
    p = build_market(cfg.markets[0], cfg.collector, stop, requests.Session(), 6000, run_id=time.time_ns() // 1000,
                     trading=set(SYMBOLS), supervisor=supervisor)
    return cfg, p


# thread -> (how to reach it, what to make raise, how to see that its work went on)
RESTARTED = {
    "snapshot": (lambda p, x: p.snapshotter, "_submit", lambda p, x, calls: p.snapshotter.stats.ok >= 1),
    "listings": (lambda p, x: p.watcher, "check", lambda p, x, calls: p.watcher.checks >= 1),
    "clock": (lambda p, x: p.clock, "sample", lambda p, x, calls: p.clock.stats.offset_us is not None),
    "reader supervisor": (lambda p, x: p.batches[0], "_open", lambda p, x, calls: p.batches[0].live()),
    "compactor": (lambda p, x: x["compactor"], "now_us", lambda p, x, calls: len(calls) >= 2),
    "uploader": (lambda p, x: x["uploader"].kick, "wait", lambda p, x, calls: len(calls) >= 2),
}


@pytest.mark.parametrize("thread", RESTARTED)
def test_a_restarted_thread_is_restarted_once_and_its_work_goes_on(tmp_path, caplog, thread):
    reach, attr, working = RESTARTED[thread]
    with Simulator(spot=dict(symbols=SYMBOLS)) as sim:
        stop = threading.Event()
        supervisor = Supervisor(stop)
        cfg, p = pipeline(tmp_path, sim, supervisor, stop, listing_check=1, snapshot_interval=2)
        extra = {"compactor": Compactor(cfg.collector.data_dir, 9, stop, lambda: time.time_ns() // 1000,
                                        grace_s=1, every_s=0.2),
                 "uploader": UploadJob(cfg, stop)}
        supervisor.add("compactor", extra["compactor"])
        supervisor.add("uploader", extra["uploader"])
        target = reach(p, extra)
        owner = target if isinstance(target, PipelineThread) else extra["uploader"]
        assert owner.on_crash == RESTART
        calls = raise_once(target, attr)
        with caplog.at_level(logging.INFO):
            supervisor.start()
            wait_until(lambda: owner.restarts == 1 and working(p, extra, calls), timeout=20)
            assert supervisor.watch() is None  # nothing fatal: the collector records on
            assert owner.is_alive()
            assert supervisor.restarts() == {owner.name: 1}
            assert supervisor.shutdown()
    assert f"thread {owner.name} crashed; restarting it" in caplog.text
    assert "injected into" in caplog.text  # with its traceback


FATAL_THREADS = {"processor": (FrameProcessor, "confirm_holes"), "writer": (PartWriter, "add")}


@pytest.mark.parametrize("thread", FATAL_THREADS)
def test_a_fatal_thread_stops_the_collector_with_status_1(tmp_path, caplog, monkeypatch, thread):
    cls, attr = FATAL_THREADS[thread]
    assert cls.on_crash == FATAL

    def broken(self, *args, **kwargs):
        raise RuntimeError(f"injected into {attr}")

    monkeypatch.setattr(cls, attr, broken)
    with Simulator(spot=dict(symbols=SYMBOLS)) as sim:
        cfg = config.load(write_config(tmp_path, [market_section("spot", sim.spot, SYMBOLS)]))
        with caplog.at_level(logging.INFO):
            began = time.monotonic()
            status = collector.run(cfg)
    assert status == 1
    assert time.monotonic() - began < 30  # the others were stopped, in order, without waiting out a timeout
    assert f"thread {thread}-spot crashed" in caplog.text
    assert f"thread died: {thread}-spot; stopping so that systemd restarts us" in caplog.text


def test_threads_stop_in_the_reverse_of_the_start_order_and_a_late_batch_is_refused(tmp_path):
    order: list[str] = []

    class Recorded(PipelineThread):
        on_crash = FATAL

        def __init__(self, stage: str, stop: threading.Event):
            super().__init__(name=stage, daemon=True)
            self.stop = stop

        def start(self) -> None:
            order.append(f"start {self.name}")
            super().start()

        def loop(self) -> None:
            self.stop.wait()
            order.append(f"end {self.name}")

    stop = threading.Event()
    supervisor = Supervisor(stop)
    for stage in STAGES:
        if stage != "relays":
            supervisor.add(stage, Recorded(stage, stop), on_stop=lambda s=stage: order.append(f"stop {s}"))
    supervisor.start()
    wait_until(lambda: len(order) == len(STAGES) - 1)
    assert order == [f"start {s}" for s in STAGES if s != "relays"]
    # a listing arrives while stopping: the listings thread is stopped before the readers,
    # and a batch added after the stop began is never started
    late = Recorded("readers", stop)
    stopping = threading.Thread(target=supervisor.shutdown)
    stopping.start()
    wait_until(lambda: supervisor.stopping)
    assert not supervisor.add("readers", late)
    stopping.join(10)
    stops = [line.split()[1] for line in order if line.startswith("stop ")]
    assert stops == [s for s in reversed(STAGES) if s != "relays"]
    assert late.ident is None


@pytest.mark.skipif(not stamped.StampedSocket(socket.socket()).kernel, reason="needs the kernel's receive stamps")
def test_a_connection_that_fell_back_moves_to_its_relay_once_the_supervisor_restarted_it(caplog):
    """The relay dies: the connection it read ends, its replacement reads its own socket
    (counted), and once the supervisor has the relay up again the connection moves back to
    it, make-before-break."""
    relay = StampRelay("stamp-relay-t")
    stop = threading.Event()
    supervisor = Supervisor(stop)
    supervisor.add_helper(relay)
    inbox = Inbox(maxsize=100_000)
    with Simulator(spot=dict(symbols=SYMBOLS)) as sim:
        streams = [f"{s.lower()}@depth@100ms" for s in SYMBOLS] + [f"{s.lower()}@depth20@100ms" for s in SYMBOLS]
        group = BatchCopies("ws-spot-0", 1, 3600, ws_url=sim.spot.ws_url, streams=streams, capacity=20)
        batch = StreamBatch("ws-spot-0", group, inbox, stop, stamped.wall_us, 3, 3600, attempts=AttemptLimiter(),
                            relay=relay)
        supervisor.add("readers", batch)
        with caplog.at_level(logging.INFO):
            supervisor.start()
            wait_until(lambda: batch.live() and not batch.fallen_back())
            first = batch.reader
            assert first is not None and first._sock is not None and first._sock.relayed is not None
            relay._proc.kill()  # type: ignore[union-attr]
            relay._proc.wait()  # type: ignore[union-attr]
            # not watched yet: the relay stays down, the new connection reads its own socket
            wait_until(lambda: batch.reader is not first and batch.live() and batch.fallen_back(), timeout=20)
            assert supervisor.watch() is None  # the relay is started again
            wait_until(lambda: batch.live() and not batch.fallen_back(), timeout=20)
            last = batch.reader
            assert last is not None and last._sock is not None and last._sock.relayed is not None
            assert supervisor.helpers_up() == (1, 1) and supervisor.restarts() == {"stamp-relay-t": 1}
            assert supervisor.shutdown()
    assert "reason=relay up again (make-before-break)" in caplog.text
    delivered_by = set()
    while not inbox.empty():
        item = inbox.get()
        if item[0] == WS:  # (the lost connection is reported too: LOST)
            delivered_by.add(item[2])
    # frames came through all three: relayed, its own socket, relayed again
    assert {first.conn_id, last.conn_id} < delivered_by and len(delivered_by) == 3
