"""Third-party Binance clients, unchanged, against `collector.py replay`: python-binance's
ThreadedDepthCacheManager, ccxt pro's watch_order_book (`binance`, `binanceusdm`),
binance-connector and binance-futures-connector, each given only the replay's URLs
(tests/clients/), on spot and USD-M, one joining at the start and one joining late. Every
book a client hands its user is the recorded book at the same update id, at every level
both know (not only the top).

Each client runs in a venv of its own (`.clients/<name>/`, made here from
`tests/clients/<name>.txt` if missing: their pins clash with the project's).
"""
from __future__ import annotations

import fcntl
import json
import subprocess
import time
from pathlib import Path

import pytest

from research.data import load
from tests.helpers import ROOT
from tests.test_replay import ReplayProcess, assert_same_book, day_of_recording, record, recorded_books

SYMBOL = "BTCUSDT"
SPEED = 0.5
START_DELAY = 2.0
# client -> (its venv under .clients/, or None: the project's .venv), script, markets
CLIENTS = {
    "ccxt": ("ccxt", "ccxt_client.py", ("spot", "futures")),
    "python-binance": ("python-binance", "python_binance_client.py", ("spot", "futures")),
    "binance-connector": (None, "connector_client.py", ("spot",)),
    "binance-futures-connector": ("futures-connector", "connector_client.py", ("futures",)),
}


def client_python(venv: str | None) -> Path:
    """The client's venv, made (once, under a lock: the tests run in parallel) if missing."""
    if venv is None:
        return ROOT / ".venv" / "bin" / "python"
    (ROOT / ".clients").mkdir(exist_ok=True)
    with open(ROOT / ".clients" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["bash", str(ROOT / "scripts" / "venv.sh"), f"tests/clients/{venv}.txt", f".clients/{venv}"],
                       cwd=ROOT, check=True, timeout=900)
    return ROOT / ".clients" / venv / "bin" / "python"


@pytest.fixture(scope="session")
def recorded(tmp_path_factory) -> Path:
    """Spot and USD-M from the simulator for ~10 s, snapshots every 3 s: recorded once for
    the whole run (the parallel workers share it, under a lock)."""
    shared = tmp_path_factory.getbasetemp().parent / "clients-recording"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "done").exists():
            record(shared, {m: [SYMBOL, "ETHUSDT"] for m in ("spot", "futures")}, snapshot_interval=3, frames=100,
                   seconds=10)
            (shared / "done").touch()
    return shared / "data"


def books_of(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("client", list(CLIENTS))
def test_a_client_builds_the_recorded_book_joining_at_the_start_and_late(client, recorded, tmp_path):
    venv, script, markets = CLIENTS[client]
    python = client_python(venv)
    day = day_of_recording(recorded)
    times = [r["received_time"] for r in load(recorded, "spot", "diff_orderbooks", symbol=SYMBOL).to_pylist()]
    day_seconds = (max(times) - min(times)) / 1e6 / SPEED
    rp = ReplayProcess(tmp_path / "replay", recorded, day, "--speed", str(SPEED), "--start-delay", str(START_DELAY))
    urls = {f"{m}_{what}": rp.urls[m][k] for m in ("spot", "futures", "delivery") for k, what in ((0, "ws"), (1, "rest"))}
    urls["futures_ws"] = urls["futures_ws"].removesuffix("/public")  # the clients add their own paths

    def start(when: str, market: str) -> subprocess.Popen:
        args = dict(urls, market=market, symbol=SYMBOL, seconds=600)  # stopped when the day is done
        with open(tmp_path / f"{when}-{market}.out", "w") as out, open(tmp_path / f"{when}-{market}.err", "w") as err:
            return subprocess.Popen([str(python), str(ROOT / "tests" / "clients" / script), json.dumps(args)],
                                    stdout=out, stderr=err, cwd=tmp_path)

    runs: dict[tuple[str, str], tuple[str, str, bool]] = {}
    procs: dict[tuple[str, str], subprocess.Popen] = {}
    try:
        procs.update({("early", m): start("early", m) for m in markets})
        rp.wait_for_log("a client subscribed", timeout=60)
        time.sleep(START_DELAY + day_seconds * 0.4)
        procs.update({("late", m): start("late", m) for m in markets})
        rp.wait_for_log("done:", timeout=day_seconds + 120)
        time.sleep(2)  # the last frames reach the clients
        for (when, market), proc in procs.items():
            alive = proc.poll() is None  # a client ends only when stopped
            proc.terminate()
            proc.wait(timeout=30)
            runs[(when, market)] = ((tmp_path / f"{when}-{market}.out").read_text(),
                                    (tmp_path / f"{when}-{market}.err").read_text(), alive)
    finally:
        for proc in procs.values():
            proc.kill()
        rp.stop()
        rp.kill()
    assert "Traceback" not in rp.log, rp.log[-3000:]
    for (when, market), (out, err, alive) in runs.items():
        assert alive and "Traceback" not in err, (client, when, market, err[-3000:])
        got = books_of(out)
        assert got, (client, when, market, err[-3000:])
        compared = compare(got, recorded, market)
        assert compared >= (50 if when == "early" else 20), (client, when, market, compared, len(got))
        print(f"{client} {market} joining {when}: first book {got[0]['t']:.2f}s after it started, "
              f"{len(got)} books, {compared} compared with the recording")
    for market in markets:  # the late one really joined late, and both followed to the end
        early_books, late_books = books_of(runs[("early", market)][0]), books_of(runs[("late", market)][0])
        key = "u" if "u" in early_books[0] else "E"
        assert late_books[0][key] > early_books[len(early_books) // 3][key], (client, market)
        assert late_books[-1][key] == early_books[-1][key], (client, market)


def compare(got: list[dict], data: Path, market: str) -> int:
    """How many of a client's books were compared with the recording (each must agree)."""
    compared = 0
    if "u" in got[0]:  # books named by update id: the recorded book after that diff
        truth = recorded_books(data, market, SYMBOL)
        for book in got:
            if book["u"] in truth:
                assert_same_book(book["bids"], book["asks"], truth[book["u"]])
                compared += 1
        return compared
    if market == "spot":  # python-binance spot: named by event time (ms), where one diff has it
        truth = recorded_books(data, market, SYMBOL)
        by_time: dict[int, list[int]] = {}
        for r in load(data, market, "diff_orderbooks", symbol=SYMBOL).to_pylist():
            by_time.setdefault(r["event_time"] // 1000, []).append(r["final_update_id"])
        for book in got:
            ids = by_time.get(book["E"], [])
            if len(ids) == 1 and ids[0] in truth:
                assert_same_book(book["bids"], book["asks"], truth[ids[0]])
                compared += 1
        return compared
    # python-binance USD-M: the partial depth stream's levels (top 10 of the recorded depth20)
    partial = {r["event_time"] // 1000: r for r in load(data, market, "partial_orderbooks", symbol=SYMBOL).to_pylist()}
    for book in got:
        r = partial[book["E"]]
        assert book["bids"] == [list(x) for x in zip(r["bid_prices"][:10], r["bid_sizes"][:10], strict=True)]
        assert book["asks"] == [list(x) for x in zip(r["ask_prices"][:10], r["ask_sizes"][:10], strict=True)]
        compared += 1
    return compared
