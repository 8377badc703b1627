#!/usr/bin/env bash
# Set up .venv if needed, then run `codec demo` (embedded model, bundled sample photos) into out/demo.
# Runs from any folder: relative paths given to it (-o, images) are taken from where it is called.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
(cd "$root" && scripts/setup.sh)
"$root/.venv/bin/codec" demo "$@"
