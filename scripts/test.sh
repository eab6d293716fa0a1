#!/usr/bin/env bash
# Set up (first run only) and run the lint and the test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
python -m pytest "$@"
