#!/usr/bin/env bash
# What a device_train.sh call returned, made ready to compare and ship: both exports (EMA and trained weights)
# joined into diffusers folders, their latent statistics written into their config.json (over the validation
# crops at their own size), and one codec bench on Kodak beside the current builtin and bicubic.
#
#   bash scripts/evaluate_device_run.sh FILES [OUT]     # FILES: the call's files_at folder; OUT: runs/device-run
#   EXTRA="--limit 4" bash scripts/evaluate_device_run.sh FILES   # a quicker look
#
# Then copy the better of OUT/ema and OUT/trained (config.json and diffusion_pytorch_model.safetensors) into
# codec/assets/builtin and say in its ABOUT.md what it is; OUT/run holds the run's config, logs and samples.
set -euo pipefail
files=${1:?usage: evaluate_device_run.sh FILES [OUT]}
out=${2:-runs/device-run}
data=${DATA:-../shared/data/kodak}
python=${PYTHON:-.venv/bin/python}
codec=("$python" -m codec)
mkdir -p "$out/run" "$out/ema" "$out/trained"
tar xzf "$files/run-files.tgz" -C "$out/run"
"$python" scripts/safetensors_parts.py join "$files"/diffusion_pytorch_model.part-*.safetensors \
    -o "$out/ema/diffusion_pytorch_model.safetensors"
"$python" scripts/safetensors_parts.py join "$files"/trained.part-*.safetensors \
    -o "$out/trained/diffusion_pytorch_model.safetensors"
resolution=$("$python" -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['data']['resolution'])" \
    "$out/run/config.yaml")
for model in ema trained; do
    install -m 644 "$out/run/config.json" "$out/$model/config.json"  # the device's files come back read-only
    # At the crops' own size: the default 512 would enlarge 128x128 crops 4x and skew the statistics.
    "${codec[@]}" stats data/val --resolution "$resolution" --posterior sample --write-config "$out/$model" \
        --model "$out/$model" --device cpu
done
cat "$out/run/validation.log"
# shellcheck disable=SC2086  # EXTRA is a list of options
"${codec[@]}" bench --model "$out/ema" --model "$out/trained" --model builtin --model bicubic --data "$data" \
    --protocol full --no-fid --classic none -o "$out/bench" --device cpu ${EXTRA:-}
