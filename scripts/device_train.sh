#!/usr/bin/env bash
# Train the embedded codec on a lent GPU in one device call and bring back its weights in fp16 (EMA and trained),
# split into parts under the call's 16 MiB-per-file limit. CONFIG picks the recipe: builtin-large (default, from
# scratch) or builtin-continue (from the shipped weights: pass model.init=codec/assets/builtin).
# No tracker (run.log_with=null): nothing but the files below comes back, and validation.log has the numbers.
#
# Here, once (the crops as lossless WebP; a call carries at most 64 MiB, working tree included):
#   python scripts/prepare_training_data.py && python scripts/pack_images.py data/train data/val --out .device
#   (cd .device && ls val | sort | tail -n +65 | sed 's|^|val/|' | xargs rm  # the 64 validation_images read
#    && rm train/generated-*  # builtin-continue only: 8 MB, so that the zip fits beside the 18.8 MB weights
#    && python3 -m zipfile -c images.zip train val && rm -r train val)
# The repository's files are 20 MB since builtin v3; the full zip (54 MB) fits only with the weights moved aside,
# which builtin-large (from scratch) allows: mv codec/assets/builtin/diffusion_pytorch_model.safetensors /tmp/
# and back after. builtin-continue needs them, so its zip leaves the generated crops out (45 MB: photos only).
# On the device (the `device` tool's run; its image has torch, accelerate, Pillow, PyYAML and tensorboard):
#   run(command="CONFIG=builtin-continue bash scripts/device_train.sh 9 model.init=codec/assets/builtin",
#       carry=[".device"], timeout_s=600)
# Back here, with the files the call returned in FILES (EMA weights; trained.part-* for the trained ones):
#   bash scripts/evaluate_device_run.sh FILES     # joins both, writes their latent statistics, benches on Kodak
set -euo pipefail
minutes=${1:-6}
out=${OUT:-runs/device-out}
config=${CONFIG:-builtin-large}
run=/tmp/$config
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# The crops travel as one zip: as 3,700 small files they took 69 MiB of the call's 64 MiB (counted in disk blocks).
if [ ! -d .device/train ] && [ -f .device/images.zip ]; then python3 -m zipfile -e .device/images.zip .device; fi
[ -d .device/train ] || { echo "device_train: .device/train missing: pack it here and carry .device" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Fail in seconds, not after the trial runs, if the image lacks something the trainer imports.
python3 -c "import accelerate, huggingface_hub, PIL, safetensors, tqdm, yaml, codec, training.train"

# 200 timed steps (about 10 s on an H100), so that start-up jitter cannot swamp the step time.
# shellcheck disable=SC2086  # TRIAL_STEPS is two numbers (a CPU check of this script sets smaller ones)
python3 scripts/train_for.py --minutes "$minutes" --config "$config" --trial-steps ${TRIAL_STEPS:-10 210} \
    data.train=.device/train data.validation=.device/val run.output_dir="$run" run.log_with=null "${@:2}" 2>&1 | tee "$out/train.log"

checkpoint=$(ls -d "$run"/checkpoints/step-* | sort | tail -1)
# Both the EMA and the trained weights come back (validation.log's psnr and trained_psnr say which is better),
# each in parts; the small files travel as one archive, since a call returns at most 8 files.
python3 -m training.export "$checkpoint" /tmp/export --fp16
python3 -m training.export "$checkpoint" /tmp/export-trained --fp16 --no-ema
python3 scripts/safetensors_parts.py split /tmp/export/diffusion_pytorch_model.safetensors "$out" --max-mb 15
cp /tmp/export-trained/diffusion_pytorch_model.safetensors /tmp/trained.safetensors
python3 scripts/safetensors_parts.py split /tmp/trained.safetensors "$out" --max-mb 15
mkdir -p /tmp/run-files
cp /tmp/export/config.json "$run/config.yaml" "$run/validation.log" /tmp/run-files/
cp "$out/train.log" /tmp/run-files/ && rm "$out/train.log"
samples=$(ls "$run"/samples/*.png 2>/dev/null | sort | tail -1 || true)
[ -n "$samples" ] && cp "$samples" /tmp/run-files/last-samples.png
tar czf "$out/run-files.tgz" -C /tmp/run-files .
cat /tmp/run-files/validation.log
ls -l "$out"
