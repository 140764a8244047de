"""The alert rules (deploy/prometheus/) against the real thing: Debian's `promtool` checks
them and runs their unit tests; then a real Prometheus server scrapes a real collector
recording from the simulator, and an alert goes pending, firing and resolved through
Prometheus' own HTTP API when the simulator stalls a connection and lets it go.

Needs Debian's `prometheus` package (the server and promtool); .ci/run installs it."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml

from simulator import Simulator
from tests.helpers import ROOT, CollectorProcess, market_section, wait_until, write_config

RULES = ROOT / "deploy" / "prometheus" / "orderbook-collector.rules.yml"
UNIT_TESTS = ROOT / "deploy" / "prometheus" / "orderbook-collector.tests.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "orderbook-collector.json"
RUNBOOK = ROOT / "docs" / "operations.md"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install prometheus (Debian's package brings it)"
    return path


def rules() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"][0]["rules"]


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    check = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0 and f"SUCCESS: {len(rules())} rules found" in check.stdout, check.stdout + check.stderr
    test = subprocess.run([tool("promtool"), "test", "rules", str(UNIT_TESTS)], capture_output=True, text=True)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_every_alert_is_tested_firing_and_silent_and_has_its_runbook_section():
    """Each rule has a unit test where it fires, and one where some series stays silent
    (a case expecting nothing, or series of a second host or market that it must leave
    alone); its description names a runbook section of docs/operations.md that exists."""
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    anchors = {re.sub(r"[^a-z0-9]+", "-", h.lower()).strip("-")  # as GitHub makes a heading's anchor
               for h in re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.M)}
    for rule in rules():
        name = rule["alert"]
        mine = [c for c in cases if any(t["alertname"] == name for t in c["alert_rule_test"])]
        fired = [a for c in mine for t in c["alert_rule_test"] for a in t["exp_alerts"]]
        assert fired, f"{name}: no unit test where it fires"
        quiet = any(not t["exp_alerts"] for c in mine for t in c["alert_rule_test"]) or any(
            len(c["input_series"]) > len({json.dumps(a["exp_labels"]) for t in c["alert_rule_test"] for a in t["exp_alerts"]})
            for c in mine)
        assert quiet, f"{name}: no unit test where it stays silent"
        anchor = re.search(r"docs/operations\.md#(alert-[a-z0-9-]+)", rule["annotations"]["description"])
        assert anchor and anchor.group(1) == f"alert-{name.lower()}", name
        assert anchor.group(1) in anchors, f"{name}: no runbook section '### Alert: {name}' in docs/operations.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alerts(api: str) -> list[dict]:
    with urllib.request.urlopen(f"{api}/api/v1/alerts", timeout=5) as r:
        return json.loads(r.read())["data"]["alerts"]


def state_of(api: str, name: str) -> str | None:
    found = [a["state"] for a in alerts(api) if a["labels"]["alertname"] == name]
    return "firing" if "firing" in found else (found[0] if found else None)


def test_a_stalled_connection_fires_the_degraded_batch_alert_in_a_real_prometheus(tmp_path):
    """A real collector (ws_redundancy 2) on the simulator, scraped every second by a real
    Prometheus with the shipped rules, evaluated every second. The simulator stalls one
    connection, and every connection opened after it, so that the batch runs on one of
    two connections: BatchDegraded goes pending, then firing after its minute; the
    simulator lets the connections go and it resolves."""
    prometheus = tool("prometheus")
    with Simulator(spot=dict(symbols=["BTCUSDT", "ETHUSDT"], updates_per_s=20)) as sim:
        m = sim.spot
        cfg = write_config(tmp_path, [market_section("spot", m, ["BTCUSDT", "ETHUSDT"], snapshot_interval=30,
                                                     snapshot_limit=100, partial_levels=5)],
                           ws_redundancy=2, ws_dead_after=2)
        proc = CollectorProcess(cfg)
        server = None
        try:
            proc.wait_for_log("recording market=spot")
            proc.wait_for_log("metrics on http://127.0.0.1:")
            metrics_port = int(re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", proc.log).group(1))
            port = free_port()
            (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": "orderbook-collector",
                                    "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
            server = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"],
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
            api = f"http://127.0.0.1:{port}"
            wait_until(lambda: _up(api), timeout=60, interval=0.5)
            wait_until(lambda: len(m.live_conns()) == 2, timeout=20)
            assert state_of(api, "BatchDegraded") is None
            # the fault: one connection stalls, and so does every one opened while it lasts
            m.faults.stall_new = True
            stalled_at = time.monotonic()
            assert sim.call(m.stall_connection(m.live_conns()[0]))
            wait_until(lambda: state_of(api, "BatchDegraded") == "pending", timeout=30, interval=0.5)
            pending_after = time.monotonic() - stalled_at
            wait_until(lambda: state_of(api, "BatchDegraded") == "firing", timeout=120, interval=0.5)
            firing_after = time.monotonic() - stalled_at
            firing = [a for a in alerts(api) if a["labels"]["alertname"] == "BatchDegraded"]
            assert firing[0]["labels"]["market"] == "spot" and firing[0]["labels"]["severity"] == "warning"
            # the fault ends: the stalled connection delivers again (or its replacement does)
            m.faults.stall_new = False
            released_at = time.monotonic()
            for conn in m.live_conns():
                sim.call(m.stall_connection(conn, False))
            wait_until(lambda: state_of(api, "BatchDegraded") is None, timeout=60, interval=0.5)
            resolved_after = time.monotonic() - released_at
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
            proc.stop()
            proc.kill()
    print(f"BatchDegraded: pending {pending_after:.1f} s after the stall, firing {firing_after:.1f} s after it, "
          f"resolved {resolved_after:.1f} s after the connections were let go")
    assert 60 <= firing_after < 120 and pending_after < firing_after - 55


def _up(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/api/v1/query?query=up", timeout=2) as r:
            result = json.loads(r.read())["data"]["result"]
        return bool(result) and result[0]["value"][1] == "1"
    except OSError:
        return False


@pytest.mark.parametrize("path", [DASHBOARD])
def test_the_dashboard_is_provisionable_and_queries_what_the_collector_exports(path):
    """The Grafana dashboard: valid JSON with a row per market (a repeated row over the
    `market` variable) and every query's metric one the collector exports (its metric
    names, read from service/metrics.py)."""
    board = json.loads(path.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 30
    assert any(v["name"] == "market" for v in board["templating"]["list"])
    rows = [p for p in board["panels"] if p["type"] == "row"]
    assert any(r.get("repeat") == "market" for r in rows)
    exported = set(re.findall(r'[cg]\("(\w+)"', (ROOT / "service" / "metrics.py").read_text()))
    exported |= {"snapshot_latency_seconds"}
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert queries
    for q in queries:
        for name in re.findall(r"\bobc_(\w+?)(?:_total|_sum|_count)?\b", q):
            assert name in exported, (name, q)
