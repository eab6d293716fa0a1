#!/usr/bin/env bash
# Set up (first run only) and run the main job: synthetic cardiac dataset, nnU-Net planning, EquiFlex and
# nnU-Net's CNN trained with the same short budget on the CPU, then the comparison table.
# Arguments go to `nnunet-equiflex main` (work folder, default ./equiflex_demo; --quick; --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
nnunet-equiflex main "$@"
