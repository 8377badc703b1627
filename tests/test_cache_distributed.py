"""`accelerate launch --multi_gpu --num_processes 2 -m codec cache` on CPU: ranks write disjoint, complete shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from cache_testing import build, folder_keys, image_folder, planned, read_rows, shard_files, tiny_model_dir

from codec.cache.shards import read_shard_meta
from codec.cache.verify import verify_cache

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(32, 32), (40, 32), (32, 48), (36, 36), (48, 40), (32, 32), (56, 32), (32, 40), (44, 44)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two(tmp_path: Path, folder: Path, out: Path, model_dir: Path) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(),
        "-m", "codec", "cache", folder, "-o", out, "--model", model_dir, "--resolution", 32,
        "--shard-size", 2, "--batch-size", 2, "--num-workers", 0,
    ]  # fmt: skip
    # HF_HOME keeps a developer's own `accelerate config` out of the test; one thread each on a shared machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_two_cpu_processes_write_disjoint_complete_shards_that_a_single_process_resumes(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    folder = image_folder(tmp_path / "images", SIZES)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    result = _launch_two(tmp_path, folder, out, model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = planned(folder_keys(folder), 2)
    n = len(blocks)
    assert n > 2 and result.stdout.count(f"9 of 10 images cached in {n} shards (0 already done, {n} written now)") == 1

    keys = []
    for index, (path, block) in enumerate(zip(shard_files(out), blocks, strict=True)):
        meta = read_shard_meta(path)
        assert meta["written_by"] == index % 2 and meta["count"] == len(block)  # both ranks wrote theirs
        rows = pq.read_table(path, columns=["key"])["key"].to_pylist()
        keys += sorted(rows + [entry["key"] for entry in meta["skipped"]])
    assert keys == sorted(p.name for p in folder.iterdir())  # disjoint and complete, in key order
    assert json.loads((out / "manifest.json").read_text())["counts"] == {
        "images": 10, "rows": 9, "skipped": 1, "shards": n,
    }  # fmt: skip
    assert [json.loads(line)["key"] for line in (out / "skipped.jsonl").read_text().splitlines()] == ["broken.png"]
    assert verify_cache(out).ok

    # One process agrees on the plan: everything is done, and its own encoding gives the same latents.
    resumed = build(folder, out, model_dir, shard_size=2)
    assert (resumed.reused, resumed.written) == (n, 0)
    single = tmp_path / "single"
    build(folder, single, model_dir, shard_size=2)
    for a, b in zip(read_rows(out), read_rows(single), strict=True):
        assert a["key"] == b["key"]
        np.testing.assert_allclose(np.asarray(a["mean"], np.float32), np.asarray(b["mean"], np.float32), atol=1e-3)


def test_a_shard_one_rank_refuses_stops_every_rank_with_the_reason_and_no_torch_traceback(tmp_path):
    # Rank 1 alone reads shard 1, written at another resolution; rank 0 had died in its next collective, on the
    # closed connection, with a traceback from inside torch.distributed.
    model_dir = tiny_model_dir(tmp_path / "model")
    folder = image_folder(tmp_path / "images", SIZES[:8])
    out, other = tmp_path / "out", tmp_path / "other"
    build(folder, out, model_dir, shard_size=2)
    build(folder, other, model_dir, shard_size=2, resolution=16)
    shard = shard_files(out)[1]
    shard.write_bytes((other / "data" / shard.name).read_bytes())

    result = _launch_two(tmp_path, folder, out, model_dir)
    assert result.returncode != 0
    assert f"{shard.name} was made with different settings" in result.stderr
    assert "stopped, since rank 1 refused" in result.stderr  # rank 0 says why it stops too
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert read_shard_meta(shard)["record"]["preprocessing"]["resolution"] == 16  # nothing was overwritten
