#!/usr/bin/env bash
# Set up .venv if needed, then round-trip sample photos with the embedded model (or --model M) into out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/codec roundtrip ../shared/data/kodak/kodim23.png -o out/demo "$@"
