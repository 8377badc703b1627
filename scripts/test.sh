#!/usr/bin/env bash
# Set up .venv if needed, then lint and run the default test suite (slow and network tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
