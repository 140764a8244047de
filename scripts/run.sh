#!/usr/bin/env bash
# Install (into .venv/) and run the collector in the foreground.
# Usage: scripts/run.sh [--config FILE]     (default: config.ini beside collector.py)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh requirements.txt
exec .venv/bin/python collector.py "$@"
