"""`accelerate launch --multi_gpu --num_processes 2 -m codec bench` on CPU: the ranks split the images and the
main process reports them all, with the numbers a single process gets."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import codec
from codec.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _per_image(output: Path) -> dict[tuple[str, str], float]:
    with (output / "per_image.csv").open() as file:
        return {(row["model"], row["image"]): float(row["psnr"]) for row in csv.DictReader(file)}


def test_two_cpu_processes_split_the_images_and_gather_them(tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    codec.AutoencoderKL(codec.preset("tiny")).save_pretrained(model_dir)
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(32, 32), (40, 32), (32, 32), (32, 48), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(data / f"im{index}.png")
    flags = ["--model", str(model_dir), "--model", "bicubic", "--data", str(data), "--protocol", "full"]
    flags += ["--no-fid", "--no-lpips", "--classic", "jpeg", "--grid-images", "1"]
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(),
        "-m", "codec", "bench", *flags, "-o", tmp_path / "two",
    ]  # fmt: skip
    # HF_HOME keeps a developer's own `accelerate config` out of the test; one thread each on a shared machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| bicubic | baseline |") == 1  # the table comes from the main process only

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["images"] == 5
    assert [row["images"] for row in summary["rows"]] == [5, 5, 5]
    assert main(["bench", *flags, "-o", str(tmp_path / "one")]) == 0
    two, one = _per_image(tmp_path / "two"), _per_image(tmp_path / "one")
    assert two.keys() == one.keys() and len(one) == 15
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=0.05), key  # batches differ between the runs; PSNR barely
