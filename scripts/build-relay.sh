#!/usr/bin/env bash
# Build the stamp relay's compiled loop (handlers/ingest/stamp_relay.c) into a virtual
# environment's bin/, next to its python, where the collector looks for it.
# Usage: scripts/build-relay.sh [VENV]   (default .venv; rebuilds only when the source changed)
# Without a C compiler it says so and stops with 0: the collector then runs the relay's
# Python loop, which does the same at about three times the CPU a wake-up (README, "How it works").
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
src=handlers/ingest/stamp_relay.c
out="$venv/bin/obc-stamp-relay"
stamp="$venv/.built-obc-stamp-relay"  # the digest of the source it was built from
digest=$(sha256sum "$src" | cut -d' ' -f1)
if [ -x "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ]; then
  exit 0
fi
cc="${CC:-cc}"
if ! command -v "$cc" >/dev/null 2>&1; then
  # a loop built from other source must not run beside this code
  rm -f "$out" "$stamp"
  echo "note: no C compiler ($cc): the stamp relays will run their Python loop (apt install gcc, then run $0 again)" >&2
  exit 0
fi
"$cc" -std=c11 -O2 -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong -fPIE -pie \
  -Wl,-z,relro,-z,now -o "$out.tmp" "$src" -lm
mv -f "$out.tmp" "$out"
echo "$digest" > "$stamp"
