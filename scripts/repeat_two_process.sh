#!/usr/bin/env bash
# Launch the tiny trainer on two CPU processes N times (default 20) and count clean exits: the check that the
# gloo process group is torn down without "terminate called without an active exception" aborts.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
failures=0
for i in $(seq 1 "$runs"); do
  out=$(mktemp -d)
  if OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/accelerate launch --num_machines 1 --mixed_precision no \
      --dynamo_backend no --multi_gpu --num_processes 2 -m training --config tiny data.resolution=32 \
      run.batch_size=1 run.max_steps=2 run.checkpoint_every=2 "run.output_dir=$out" > "$out.log" 2>&1; then
    echo "run $i: ok"
  else
    failures=$((failures + 1))
    echo "run $i: FAILED (exit $?), log $out.log"; grep -m3 -iE "terminate|error" "$out.log"
  fi
  rm -rf "$out"
done
echo "$((runs - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
