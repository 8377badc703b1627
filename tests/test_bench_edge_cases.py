"""`codec bench` on awkward sets: images too small for a metric's window, lossless reconstructions, and a
scoring failure, which must name the image."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codec.bench.perceptual import load_lpips
from codec.bench.scoring import Scorer
from codec.cli import main


def _noisy(seed: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 40 * seed)], axis=2)
    return np.clip(base + np.random.default_rng(seed).normal(0, 15, base.shape), 0, 255).astype(np.uint8)


def _bench(data: Path, output: Path) -> tuple[dict, list[dict]]:
    args = ["bench", "--model", "bicubic", "--data", str(data), "--protocol", "full", "--no-fid", "--no-lpips"]
    assert main([*args, "--classic", "none", "--device", "cpu", "-o", str(output)]) == 0
    with (output / "per_image.csv").open() as file:
        return json.loads((output / "summary.json").read_text()), list(csv.DictReader(file))


def test_images_under_the_ssim_window_are_reported_not_fatal(tmp_path):
    data = tmp_path / "small"
    data.mkdir()
    for name, (height, width) in {"a.png": (64, 64), "b.png": (8, 10), "c.png": (20, 20)}.items():
        Image.fromarray(_noisy(len(name), height, width)).save(data / name)
    summary, rows = _bench(data, tmp_path / "out")
    ssim = {row["image"]: row["ssim"] for row in rows}
    assert ssim["b"] == "" and float(ssim["a"]) > 0 and float(ssim["c"]) > 0
    (row,) = summary["rows"]
    assert row["ssim"] is None and math.isfinite(row["psnr"])  # a mean over some images would not compare
    assert "11 pixels" in summary["notes"]["ssim"]


def test_a_lossless_image_counts_at_the_ceiling_not_left_out(tmp_path):
    data = tmp_path / "flat"
    data.mkdir()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(data / "a_flat.png")  # bicubic gives it back exactly
    Image.fromarray(_noisy(1, 64, 64)).save(data / "b.png")
    summary, rows = _bench(data, tmp_path / "out")
    psnr = {row["image"]: float(row["psnr"]) for row in rows}
    assert math.isinf(psnr["a_flat"]) and math.isfinite(psnr["b"])
    (row,) = summary["rows"]
    assert row["psnr"] == pytest.approx((100.0 + psnr["b"]) / 2)
    assert "1 lossless" in summary["notes"]["psnr"] and "per-image" in summary["notes"]["psnr"]


def test_lpips_skips_images_its_trunk_cannot_see_and_scoring_errors_name_the_image(tmp_path):
    pytest.importorskip("lpips")
    small = _noisy(1, 24, 24)
    alex, vgg = load_lpips("alex", "cpu", random_trunk=True), load_lpips("vgg", "cpu", random_trunk=True)
    assert alex(small, small) is None  # AlexNet's pooling needs 31 pixels a side
    assert vgg(small, small) == pytest.approx(0.0, abs=1e-6)
    scorer = Scorer(tmp_path, [], None)
    with pytest.raises(ValueError, match=r"kodim07 \(bicubic\): scoring failed: .*differs"):
        scorer.score("bicubic", "bicubic", "kodim07", _noisy(1, 32, 32), _noisy(1, 32, 40))


def test_every_model_is_checked_before_any_work(tmp_path, capsys):
    data = tmp_path / "images"
    data.mkdir()
    Image.fromarray(_noisy(1, 32, 32)).save(data / "a.png")
    for typo, reason in (("preset:tinny", "unknown preset"), (str(tmp_path / "my-vae"), "no such folder or file")):
        args = ["bench", "--model", "bicubic", "--model", typo, "--data", str(data), "--no-fid", "--no-lpips"]
        assert main([*args, "--classic", "none", "--device", "cpu", "-o", str(tmp_path / "out")]) == 2
        assert reason in capsys.readouterr().err
        assert not (tmp_path / "out" / "reference").exists()  # refused before the references were written


def test_a_rerun_into_a_folder_inside_the_data_measures_the_same_images(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for seed in range(2):
        Image.fromarray(_noisy(seed, 32, 40)).save(data / f"{seed}.png")
    first, _ = _bench(data, data / "bench")
    again, rows = _bench(data, data / "bench")  # its references, reconstructions and grids are now in the data
    assert first["images"] == again["images"] == 2 and sorted(row["image"] for row in rows) == ["0", "1"]
    assert again["rows"][0]["psnr"] == first["rows"][0]["psnr"]
    for output in (data, tmp_path):  # the data folder itself, or a folder that holds it: its images still count
        for _ in range(2):
            summary, _ = _bench(data, output)
            assert summary["images"] == 2


def test_a_baseline_named_twice_gets_two_rows(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    Image.fromarray(_noisy(0, 32, 40)).save(data / "a.png")
    args = ["bench", "--model", "bicubic", "--model", "bicubic", "--data", str(data), "--protocol", "full"]
    assert main([*args, "--no-fid", "--no-lpips", "--classic", "none", "-o", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(row["name"], row["images"]) for row in summary["rows"]] == [("bicubic", 1), ("bicubic-2", 1)]
