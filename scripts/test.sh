#!/usr/bin/env bash
# Install (into .venv/) and run the lint, the type checker and the whole test suite.
# Usage: scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh requirements-dev.txt
.venv/bin/ruff check .
.venv/bin/mypy  # everything but the tests (pyproject.toml)
# the end-to-end tests mostly wait on sockets and clocks: run four at a time
exec .venv/bin/python -m pytest -n 4 "$@"
