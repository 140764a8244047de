#!/usr/bin/env bash
# Demo without internet: start the loopback simulator, record from it for a while,
# stop with SIGTERM, and show the output tree.
# Usage: scripts/demo.sh [seconds=30] [folder=demo]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
dir="${2:-demo}"
scripts/venv.sh requirements.txt
mkdir -p "$dir"
port_spot=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
port_fut=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
symbols="BTCUSDT,ETHUSDT,BNBUSDT,SOLUSDT,XRPUSDT"
.venv/bin/python -m simulator --spot-port "$port_spot" --futures-port "$port_fut" --symbols "$symbols" &
sim=$!
trap 'kill $sim 2>/dev/null || true' EXIT
sleep 1.5
cat > "$dir/config.ini" <<INI
[collector]
data_dir = data
flush_interval = 2
status_interval = 10
[spot]
symbols = ${symbols}
ws_url = ws://127.0.0.1:${port_spot}
rest_url = http://127.0.0.1:${port_spot}
snapshot_interval = 10
[futures]
symbols = ${symbols}
ws_url = ws://127.0.0.1:${port_fut}/public
rest_url = http://127.0.0.1:${port_fut}
snapshot_interval = 10
INI
.venv/bin/python collector.py --config "$dir/config.ini" &
col=$!
sleep "$seconds"
kill -TERM $col
wait $col
echo "--- output tree ($dir/data)"
find "$dir/data" -maxdepth 3 | sort
.venv/bin/python - "$dir/data" <<'PY'
import sys
import pyarrow.dataset as ds
root = sys.argv[1]
for market in ("spot", "futures"):
    for kind in ("diff_orderbooks", "partial_orderbooks", "orderbooks", "gaps"):
        t = ds.dataset(f"{root}/{market}/{kind}", format="parquet").to_table()
        print(f"{market:8} {kind:19} rows={t.num_rows}")
PY
