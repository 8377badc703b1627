"""`accelerate launch --multi_gpu --num_processes 2 -m codec cache` over tar shards, on CPU: each process takes its
share of the input shards, and the cache has the keys and latents of a single process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from cache_testing import tiny_model_dir
from shard_testing import build, rows, write_tars

from codec.cache.input_plan import read_part_meta
from codec.cache.locations import Location

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_share_the_input_shards_and_match_one_process(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    shards = tmp_path / "shards"
    write_tars(shards, range(5), per_shard=3, broken=(4,))
    out = tmp_path / "out"
    command = [
        Path(sys.executable).parent / "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", _free_port(), "-m", "codec", "cache", f"{shards}/{{00000..00004}}.tar", "-o", out,
        "--model", model_dir, "--resolution", 32, "--shard-size", 2, "--batch-size", 2, "--num-workers", 0,
    ]  # fmt: skip
    # HF_HOME keeps a developer's own `accelerate config` out of the test; one thread each on a shared machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("14 of 15 images cached in 10 shards (0 already done, 10 written now)") == 1

    manifest = json.loads((out / "manifest.json").read_text())
    writers = {read_part_meta(Location(out), entry["file"])["written_by"] for entry in manifest["shards"]}
    assert writers == {0, 1}  # both processes took inputs
    single = tmp_path / "single"
    build(shards, single, model_dir)
    assert [r["key"] for r in rows(out)] == [r["key"] for r in rows(single)]
    for a, b in zip(rows(out), rows(single), strict=True):
        np.testing.assert_allclose(np.asarray(a["mean"], np.float32), np.asarray(b["mean"], np.float32), atol=1e-3)
    assert (out / "skipped.jsonl").read_text() == (single / "skipped.jsonl").read_text()
    resumed = build(shards, out, model_dir)  # one process agrees the work is done
    assert (resumed.reused, resumed.written) == (10, 0)
