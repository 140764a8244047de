#!/usr/bin/env bash
# Create .venv/ at the repository root (or VENV) and install the pinned requirements.
# Usage: scripts/venv.sh [requirements file] [VENV]   (idempotent: reinstalls only when the file changed)
# A third-party client the replay is tested with gets a venv of its own (tests/clients/),
# since their pins clash with the project's and with one another (`binance` is three packages).
# The project's own environment also gets the stamp relay's compiled loop (scripts/build-relay.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
venv="${2:-.venv}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "error: Python >= 3.10 is required ($("$python" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" || { echo "error: cannot create $venv (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
fi
stamp="$venv/.installed-$(basename "$req")"
digest=$(cat "$req" requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$req"
  echo "$digest" > "$stamp"
fi
case "$req" in
  requirements.txt|requirements-dev.txt) scripts/build-relay.sh "$venv" ;;
esac
