#!/usr/bin/env bash
# Create .venv with everything latent-codec needs, or bring an existing one up to date. Safe to re-run.
#
# torch and torchvision are installed first, as a matched pair from PyPI: lpips needs torchvision, whose wheel
# pins one exact torch and is built against PyPI's (CUDA) torch. A CPU-only torch from elsewhere would make
# `import torchvision` (and with it diffusers and lpips) fail. The CUDA build runs fine on CPU-only machines.
# `torch===2.13.0` (arbitrary equality) matches PyPI's 2.13.0 and not a local 2.13.0+cpu wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch===2.13.0}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.28.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.latent-codec-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC" "$TORCHVISION_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test]"
touch "$stamp"
