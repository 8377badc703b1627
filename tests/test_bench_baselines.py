"""The bicubic baselines take the rate of the VAE they are compared with: its factor and its channel count."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import codec
from codec.bench.baselines import SD_LATENT, LatentShape, ResampleBaseline, side_factor
from codec.cli import main


@pytest.mark.parametrize(
    ("latent", "bicubic", "bicubic_latent"),
    [
        (SD_LATENT, 8.0, math.sqrt(48)),  # SD: 4 values per 64 pixels
        (LatentShape(8, 16), 8.0, 8 * math.sqrt(3 / 16)),  # FLUX, SD3: 16 per 64
        (LatentShape(16, 32), 16.0, 16 * math.sqrt(3 / 32)),  # 32 per 256
    ],
)
def test_side_factors_keep_the_values_of_the_latent(latent, bicubic, bicubic_latent):
    assert side_factor("bicubic", latent) == pytest.approx(bicubic)
    assert side_factor("bicubic-latent", latent) == pytest.approx(bicubic_latent)
    x = torch.rand(1, 3, 256, 384) * 2 - 1
    stored = ResampleBaseline("bicubic-latent", "bicubic-latent", "fp16", torch.device("cpu"), latent).encode(x)
    latent_values = latent.channels * (256 // latent.factor) * (384 // latent.factor)
    assert stored.values.numel() == pytest.approx(latent_values, rel=0.02)
    stored = ResampleBaseline("bicubic", "bicubic", "fp16", torch.device("cpu"), latent).encode(x)
    assert stored.values.shape == (1, 3, 256 // latent.factor, 384 // latent.factor)


def _model(folder: Path, channels: int) -> Path:
    torch.manual_seed(0)
    codec.AutoencoderKL(dataclasses.replace(codec.preset("tiny"), latent_channels=channels)).save_pretrained(folder)
    return folder


def _bench(tmp_path: Path, models: list) -> dict:
    data = tmp_path / "photos"
    data.mkdir(exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "a.png")
    output = tmp_path / "out"
    flags = ["--data", str(data), "--protocol", "full", "--no-fid", "--no-lpips", "--classic", "none"]
    assert (
        main(["bench", *(word for model in models for word in ("--model", str(model))), *flags, "-o", str(output)]) == 0
    )
    return {row["name"]: row for row in json.loads((output / "summary.json").read_text())["rows"]}


def test_a_16_channel_vae_is_compared_with_baselines_at_its_own_rate(tmp_path):
    wide = _model(tmp_path / "wide", 16)
    rows = _bench(tmp_path, ["bicubic-latent", wide, "bicubic"])
    assert list(rows) == ["bicubic-latent", "wide", "bicubic"]  # the order asked for
    assert rows["wide"]["bpp"] == pytest.approx(16 * 16 / 64)  # 16 fp16 values per 64 pixels
    # Within the rounding of a 64-pixel side to whole pixels (the old baseline kept a quarter of this rate).
    assert rows["bicubic-latent"]["bpp"] == pytest.approx(rows["wide"]["bpp"], rel=0.06)
    assert rows["bicubic"]["bpp"] == pytest.approx(3 * 16 / 64)
    assert rows["bicubic-latent"]["matched_to"] == ["wide"]
    assert "wide's 16-channel latent at factor 8" in rows["bicubic-latent"]["description"]


def test_vaes_of_two_latent_shapes_get_a_baseline_row_each(tmp_path):
    narrow, wide = _model(tmp_path / "narrow", 4), _model(tmp_path / "wide", 16)
    rows = _bench(tmp_path, [narrow, wide, "bicubic-latent"])
    assert list(rows) == ["narrow", "wide", "bicubic-latent@narrow", "bicubic-latent@wide"]
    for model in ("narrow", "wide"):
        assert rows[f"bicubic-latent@{model}"]["bpp"] == pytest.approx(rows[model]["bpp"], rel=0.06)
