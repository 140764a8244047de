#!/usr/bin/env bash
# Print the template unit orderbook-collector@.service, made from the main unit: instance
# %i records one market (`collector.py run --market %i`), for a host whose markets one
# interpreter cannot hold (BENCHMARKS.md, The whole universe). One source for both units.
set -euo pipefail
cd "$(dirname "$0")/.."
sed -e 's|^Description=.*|Description=Binance order-book collector, market %i|' \
    -e 's|collector.py --config /etc/orderbook-collector/config.ini|collector.py run --market %i --config /etc/orderbook-collector/config.ini|' \
    systemd/orderbook-collector.service
