#!/usr/bin/env bash
# Check the systemd units (the main one and the per-market template made from it):
# `systemd-analyze verify` clean, and `systemd-analyze security` exposure 2.0 or lower
# ("OK"). Needs systemd-analyze (Debian/Ubuntu package: systemd).
set -euo pipefail
cd "$(dirname "$0")/.."
unit=systemd/orderbook-collector.service
if ! command -v systemd-analyze >/dev/null; then
  echo "error: systemd-analyze not found (apt install systemd)" >&2
  exit 1
fi
# verify needs ExecStart to exist: check a copy that points at this machine's python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|/opt/orderbook-collector/.venv/bin/python|$(command -v python3)|" "$unit" > "$tmp/orderbook-collector.service"
scripts/template-unit.sh | sed "s|/opt/orderbook-collector/.venv/bin/python|$(command -v python3)|" > "$tmp/orderbook-collector@.service"
grep -q -- "run --market %i" "$tmp/orderbook-collector@.service" || { echo "error: the template unit's ExecStart was not rewritten" >&2; exit 1; }
out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "$tmp/orderbook-collector.service" "$tmp/orderbook-collector@spot.service" 2>&1 | grep -v "Failed to connect\|Transport endpoint\|Cannot find unit for notify" || true)
if [ -n "$out" ]; then
  echo "systemd-analyze verify:" >&2
  echo "$out" >&2
  exit 1
fi
score=$(systemd-analyze security --offline=true "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level[^:]*: *\([0-9.]*\).*/\1/p')
echo "systemd-analyze verify: clean; security exposure: $score"
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || { echo "error: exposure $score is above 2.0" >&2; exit 1; }
