#!/usr/bin/env bash
# Set up .venv if needed, then run `codec demo` (embedded model, bundled sample photos) into out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/codec demo "$@"
