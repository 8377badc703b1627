#!/usr/bin/env bash
# bench_speed's GPU rows (issue #7: fp32/bf16/fp16, compiled, images/s at 512x512, large tiled decodes) on a
# lent device, whose image has torch but not diffusers. The report is printed into $OUT/bench.log; paste it into
# BENCHMARKS.md here (the device's copy of the repository is thrown away).
#
# Here, once: diffusers without its pipelines (1.8 MB instead of 6.4, so that it fits beside the training data
# in the 64 MiB a call carries; bench_speed needs only diffusers.AutoencoderKL), and importlib_metadata:
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl /tmp/dtrim
#   pip download --no-deps --only-binary=:all: -d /tmp/dtrim diffusers==0.42.1 importlib_metadata
#   (cd /tmp/dtrim && unzip -q diffusers-*.whl && rm -rf diffusers/pipelines/*/ diffusers/modular_pipelines/*/ \
#     && tar czf "$OLDPWD/.whl/diffusers-trim.tgz" diffusers) && cp /tmp/dtrim/importlib_metadata-*.whl .whl/
# On the device, after device_train.sh in the same call or alone:
#   run(command="bash scripts/device_bench.sh", carry=[".whl"], timeout_s=300)
# `bash scripts/device_bench.sh quick` (about a minute): the 512x512 rows in fp32 and bf16, the 1024 tiled decode
# and its profile, for a call that spends most of its minutes training.
set -uo pipefail  # no -e: the compiled rows are run even when the first invocation fails or runs out of time
out=${OUT:-runs/device-out}
# With the builtin weights moved aside for the call (device_train.sh's header), the quality rows use the model
# device_train.sh has just exported.
if [ ! -f codec/assets/builtin/diffusion_pytorch_model.safetensors ] && [ -f /tmp/export/config.json ]; then
    cp /tmp/export/config.json /tmp/export/diffusion_pytorch_model.safetensors codec/assets/builtin/
fi
mkdir -p "$out" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/importlib_metadata-*.whl
tar xzf .whl/diffusers-trim.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import diffusers; print('diffusers', diffusers.__version__)" || exit 2
if [ "${1:-}" = quick ]; then
    timeout 90 python3 scripts/bench_speed.py --device cuda --sizes 512 --batches 1 4 --dtypes fp32 bf16 \
        --repeats 10 --tiled-sizes 1024 --tiled-repeats 3 --out /tmp/bench --no-write 2>&1 | tee -a "$out/bench.log"
    timeout 60 python3 scripts/profile_decode.py --size 1024 --tiled --device cuda 2>&1 | tee -a "$out/bench.log"
    exit 0
fi
timeout "${BENCH_SECONDS:-130}" python3 scripts/bench_speed.py --device cuda --sizes 256 512 --batches 1 4 \
    --dtypes fp32 bf16 fp16 --repeats 10 --tiled-sizes 1024 2048 --tiled-repeats 3 --out /tmp/bench --no-write \
    2>&1 | tee -a "$out/bench.log"
# torch.compile's first call per shape compiles (about a minute each side): one size, batch and dtype.
timeout "${COMPILE_SECONDS:-100}" python3 scripts/bench_speed.py --device cuda --sizes 512 --batches 4 \
    --dtypes bf16 --compile-dtypes bf16 --repeats 10 --tiled-sizes --out /tmp/bench-compiled --no-write \
    2>&1 | tee -a "$out/bench.log"
# Where the tiled 1024x1024 decode's time goes on the GPU (1.07 s against 0.16 untiled on the H200): both profiles.
for mode in --tiled ""; do
    timeout 60 python3 scripts/profile_decode.py --size 1024 $mode --device cuda 2>&1 | tee -a "$out/bench.log"
done
