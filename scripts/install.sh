#!/usr/bin/env bash
# Install (or upgrade) orderbook-collector as a systemd service on Debian 12 / Ubuntu 22.04+.
#
#   sudo scripts/install.sh                 install or upgrade, then: systemctl enable --now orderbook-collector
#   scripts/install.sh --root DIR           the same file layout under DIR, without user, chown or systemctl (tests)
#
# Creates: the system user `orderbook`; the program and its virtualenv in /opt/orderbook-collector;
# /etc/orderbook-collector/config.ini (kept on upgrade); /etc/orderbook-collector/env for upload
# secrets (mode 0600, kept on upgrade); the data folder /var/lib/orderbook-collector; the unit.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
root=""
if [ "${1:-}" = "--root" ]; then root="${2:?--root needs a folder}"; fi
prefix="$root/opt/orderbook-collector"
etc="$root/etc/orderbook-collector"
data="$root/var/lib/orderbook-collector"
units="$root/etc/systemd/system"
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "error: run as root (sudo scripts/install.sh)" >&2
  exit 1
fi
if [ -z "$root" ] && ! id orderbook >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/orderbook-collector --no-create-home --shell /usr/sbin/nologin orderbook
fi
install -d -m 0755 "$prefix" "$units"
# the program: tracked files only (no .venv, no data), replaced on upgrade
tar -C "$src" --exclude=.venv --exclude=.git --exclude=data --exclude=demo --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude=.hypothesis --exclude=tests -cf - . | tar -C "$prefix" -xf -
python3 -m venv "$prefix/.venv"
"$prefix/.venv/bin/python" -m pip install --quiet --upgrade pip
"$prefix/.venv/bin/python" -m pip install --quiet -r "$prefix/requirements.txt"
"$src/scripts/build-relay.sh" "$prefix/.venv"  # the stamp relay's compiled loop, beside the venv's python
install -d -m 0750 "$etc"
if [ ! -f "$etc/config.ini" ]; then
  sed 's|^data_dir = data$|data_dir = /var/lib/orderbook-collector/data|' "$src/config.ini" > "$etc/config.ini"
  chmod 0640 "$etc/config.ini"
  echo "created $etc/config.ini (edit symbols and [upload] there)"
else
  echo "kept $etc/config.ini"
fi
if [ ! -f "$etc/env" ]; then
  install -m 0600 "$src/.env.example" "$etc/env"
  echo "created $etc/env (mode 0600: put the R2_* secrets there)"
fi
install -d -m 0750 "$data"
install -m 0644 "$src/systemd/orderbook-collector.service" "$units/orderbook-collector.service"
# one market per process: orderbook-collector@spot, @futures, @delivery (instead of the unit above)
"$src/scripts/template-unit.sh" > "$units/orderbook-collector@.service"
chmod 0644 "$units/orderbook-collector@.service"
if [ -z "$root" ]; then
  chgrp orderbook "$etc" "$etc/config.ini"
  chown orderbook:orderbook "$data"
  "$prefix/.venv/bin/python" "$prefix/collector.py" check-config --config "$etc/config.ini"
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "next: systemctl enable --now orderbook-collector; journalctl -u orderbook-collector -f"
  fi
fi
echo "installed into ${root:-/}"
