#!/usr/bin/env bash
# Set up (first run only) and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
nnunet-equiflex demo "$@"
