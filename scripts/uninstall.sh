#!/usr/bin/env bash
# Remove the service and the program; keep the data (/var/lib/orderbook-collector), the
# config and the secrets (/etc/orderbook-collector) and the user. Usage as install.sh.
set -euo pipefail
root=""
if [ "${1:-}" = "--root" ]; then root="${2:?--root needs a folder}"; fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl disable --now orderbook-collector 2>/dev/null || true
fi
rm -f "$root/etc/systemd/system/orderbook-collector.service" "$root/etc/systemd/system/orderbook-collector@.service"
rm -rf "$root/opt/orderbook-collector"
if [ -z "$root" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
echo "removed the service and /opt/orderbook-collector; kept $root/var/lib/orderbook-collector (data)" \
     "and $root/etc/orderbook-collector (config, secrets)"
