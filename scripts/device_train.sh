#!/usr/bin/env bash
# Train the embedded codec's larger recipe (training/configs/builtin-large.yaml) on a lent GPU in one device call
# and bring back its EMA weights in fp16, split into parts under the call's 16 MiB-per-file limit.
# No tracker (run.log_with=null): nothing but the files below comes back, and validation.log has the numbers.
#
# Here, once (the crops as lossless WebP fit the 64 MiB that a call carries):
#   python scripts/prepare_training_data.py && python scripts/pack_images.py data/train data/val --out .device
#   (cd .device && ls val | sort | tail -n +65 | sed 's|^|val/|' | xargs rm  # the 64 validation_images read
#    && python3 -m zipfile -c images.zip train val && rm -r train val)
# The call carries the working tree too: since builtin v3 (18.8 MB) the repository's files are 20 MB, and with the
# 54 MB zip that is over the 64 MiB. Training needs no builtin weights, so move them aside for the call and put
# them back after it (`git status` shows them deleted meanwhile):
#   mv codec/assets/builtin/diffusion_pytorch_model.safetensors /tmp/   # ... the run ..., then move it back
# On the device (the `device` tool's run; its image has torch, accelerate, Pillow, PyYAML and tensorboard):
#   run(command="bash scripts/device_train.sh 6", carry=[".device"], timeout_s=600)
# Back here, with the files the call returned in FILES (EMA weights; trained.part-* for the trained ones):
#   bash scripts/evaluate_device_run.sh FILES     # joins both, writes their latent statistics, benches on Kodak
set -euo pipefail
minutes=${1:-6}
out=${OUT:-runs/device-out}
run=/tmp/builtin-large
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
python3 scripts/train_for.py --minutes "$minutes" --config builtin-large --trial-steps ${TRIAL_STEPS:-10 210} \
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
