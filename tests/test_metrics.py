"""codec.metrics against scikit-image and torchmetrics, and codec.visual's pictures."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import codec.metrics
from codec.metrics import ms_ssim, psnr, ssim
from codec.visual import LABEL_HEIGHT, error_heatmap, grid, label_width, side_by_side

KODAK = Path("/work/shared/data/kodak/kodim23.png")
NOISE_LEVELS = (1.0, 4.0, 12.0, 40.0, 100.0)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 200x240 crop of a real photo (or, without the Kodak set, a synthetic gradient with noise)."""
    if KODAK.is_file():
        with Image.open(KODAK) as image:
            return np.asarray(image.convert("RGB"))[100:300, 200:440].copy()
    y, x = np.mgrid[0:200, 0:240]
    base = np.stack([x / 240 * 255, y / 200 * 255, (x + y) / 440 * 255], axis=2)
    noise = np.random.default_rng(7).normal(0, 20, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return np.clip(np.rint(image.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return structural_similarity(
        a,
        b,
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )


def test_photo_shape(photo):
    assert photo.shape == (200, 240, 3) and photo.dtype == np.uint8
    assert photo.std() > 10  # real content, not a flat image


@pytest.mark.parametrize("sigma", NOISE_LEVELS)
def test_psnr_and_ssim_match_skimage(photo, sigma):
    from skimage.metrics import peak_signal_noise_ratio

    noisy = _noisy(photo, sigma, seed=int(sigma * 10))
    expected_psnr = peak_signal_noise_ratio(photo, noisy, data_range=255)
    ours_psnr = psnr(photo, noisy)
    assert ours_psnr.shape == (1,)
    assert abs(ours_psnr.item() - expected_psnr) < 1e-6
    expected_ssim = _skimage_ssim(photo, noisy)
    ours_ssim = ssim(photo, noisy)
    assert ours_ssim.shape == (1,)
    assert abs(ours_ssim.item() - expected_ssim) < 1e-5, (ours_ssim.item(), expected_ssim)
    assert 0 < ours_ssim.item() < 1


def test_metrics_fall_with_noise(photo):
    noisy = [_noisy(photo, sigma, seed=1) for sigma in NOISE_LEVELS]
    psnrs = [psnr(photo, n).item() for n in noisy]
    ssims = [ssim(photo, n).item() for n in noisy]
    assert psnrs == sorted(psnrs, reverse=True)
    assert ssims == sorted(ssims, reverse=True)


def test_batch_gives_per_image_values(photo):
    from skimage.metrics import peak_signal_noise_ratio

    references = np.stack([photo, photo[::-1].copy(), photo[:, ::-1].copy()])
    noisy = np.stack([_noisy(r, s, seed=i) for i, (r, s) in enumerate(zip(references, (3.0, 15.0, 50.0), strict=True))])
    batch_psnr, batch_ssim = psnr(references, noisy), ssim(references, noisy)
    assert batch_psnr.shape == (3,) and batch_ssim.shape == (3,)
    for i in range(3):
        assert abs(batch_psnr[i].item() - peak_signal_noise_ratio(references[i], noisy[i], data_range=255)) < 1e-6
        assert abs(batch_ssim[i].item() - _skimage_ssim(references[i], noisy[i])) < 1e-5
    assert len(set(batch_psnr.tolist())) == 3
    # Torch tensors, channels-first float in [0, 255], give the same numbers as uint8 arrays.
    as_nchw = torch.from_numpy(references).permute(0, 3, 1, 2).float()
    noisy_nchw = torch.from_numpy(noisy).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(psnr(as_nchw, noisy_nchw), batch_psnr, rtol=0, atol=1e-9)
    torch.testing.assert_close(ssim(as_nchw, noisy_nchw), batch_ssim, rtol=0, atol=1e-6)


def test_identical_images(photo):
    assert psnr(photo, photo).item() == math.inf
    assert ssim(photo, photo).item() == pytest.approx(1.0, abs=1e-9)
    assert ms_ssim(photo, photo).item() == pytest.approx(1.0, abs=1e-9)


def test_ssim_rejects_tiny_images():
    with pytest.raises(ValueError):
        ssim(np.zeros((10, 20, 3), np.uint8), np.zeros((10, 20, 3), np.uint8))


@pytest.mark.parametrize("sigma", (4.0, 25.0, 80.0))
def test_ms_ssim_matches_torchmetrics(photo, sigma):
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    pair = np.stack([photo, photo[::-1].copy()])
    noisy = np.stack([_noisy(p, sigma, seed=i) for i, p in enumerate(pair)])
    # The second is also darker and flatter: the coarsest scale's luminance term is then not about 1.
    noisy[1] = np.clip(noisy[1].astype(np.float64) * 0.6 + 20, 0, 255).astype(np.uint8)
    ours = ms_ssim(pair, noisy)
    assert ours.shape == (2,)
    expected = multiscale_structural_similarity_index_measure(
        torch.from_numpy(noisy).permute(0, 3, 1, 2).float(),
        torch.from_numpy(pair).permute(0, 3, 1, 2).float(),
        data_range=255.0,
        reduction="none",
    )
    torch.testing.assert_close(ours, expected.double(), rtol=0, atol=1e-3)
    assert 0 < ours.min().item() < 1


def test_ms_ssim_size_limit(photo):
    crop = photo[:176, :176]
    assert ms_ssim(crop, _noisy(crop, 10.0, seed=0)).shape == (1,)
    for small in (photo[:175, :200], photo[:200, :175], photo[:100, :100]):
        with pytest.raises(ValueError, match="176"):
            ms_ssim(small, small)


def test_metrics_in_many_bands_are_the_metrics_in_one(photo, monkeypatch):
    from skimage.metrics import peak_signal_noise_ratio

    odd = photo[:199, :237]  # sides that split unevenly into bands and into MS-SSIM's halvings
    noisy = _noisy(odd, 12.0, seed=3)
    whole = ms_ssim(odd, noisy)
    monkeypatch.setattr(codec.metrics, "BAND_VALUES", 2000)  # bands of a row or two
    assert abs(psnr(odd, noisy).item() - peak_signal_noise_ratio(odd, noisy, data_range=255)) < 1e-9
    assert abs(ssim(odd, noisy).item() - _skimage_ssim(odd, noisy)) < 1e-5
    assert abs(ms_ssim(odd, noisy).item() - whole.item()) < 1e-6  # float32 windows, summed in other groupings


_PEAK = """
import numpy as np, torch
from codec.metrics import psnr, ssim
torch.set_num_threads(1)
def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
rng = np.random.default_rng(0)
a = rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
b = np.clip(a.astype(np.int16) + rng.integers(-6, 7, a.shape, dtype=np.int16), 0, 255).astype(np.uint8)
psnr(a[:64, :64], b[:64, :64]), ssim(a[:64, :64], b[:64, :64])  # torch's own first allocations
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
base = status("VmRSS")
psnr(a, b), ssim(a, b)
print((status("VmHWM") - base) / 2**20)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's resettable peak memory")
def test_metrics_of_a_large_image_need_little_memory_beyond_it():
    # Whole-image float64 copies made a 2048x2048 pair's PSNR and SSIM peak at 840 MiB over its 24 MiB of pixels.
    result = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, check=True)
    assert float(result.stdout) < 64, result.stdout  # 24 MiB in bands


# ---- codec.visual -----------------------------------------------------------------------------------------


def test_error_heatmap_zero_error_is_black(photo):
    heat = error_heatmap(photo, photo)
    assert heat.mode == "RGB" and heat.size == (240, 200)
    assert np.asarray(heat).max() == 0


def test_error_heatmap_large_error_is_bright(photo):
    inverted = 255 - photo
    wrong = photo.copy()
    wrong[:100] = inverted[:100]  # top half badly wrong, bottom half exact
    heat = np.asarray(error_heatmap(photo, wrong)).astype(int)
    assert heat.shape == (200, 240, 3)
    assert heat[100:].max() == 0
    error = np.abs(photo.astype(int) - wrong.astype(int)).mean(axis=2)
    saturated = error[:100] >= 32  # full scale: 32 levels of error give yellow, not the canvas' white
    assert saturated.mean() > 0.5
    assert np.all(heat[:100][saturated] == [255, 255, 0])
    # Brightness grows with the error: a small uniform error is dim red, a larger one brighter.
    dim = np.asarray(error_heatmap(photo, np.clip(photo.astype(int) + 4, 0, 255).astype(np.uint8)))
    mid = np.asarray(error_heatmap(photo, np.clip(photo.astype(int) + 16, 0, 255).astype(np.uint8)))
    assert 0 < dim[150:].mean() < mid[150:].mean() < 255


def test_side_by_side_size():
    images = [Image.new("RGB", (30, 20), "red"), Image.new("RGB", (50, 40), "blue"), Image.new("RGB", (20, 10))]
    canvas = side_by_side(images, ["a", "b", "c"], gap=4)
    assert canvas.size == (30 + 50 + 20 + 2 * 4, 40 + LABEL_HEIGHT)
    pixels = np.asarray(canvas)
    assert pixels[LABEL_HEIGHT + 5, 5].tolist() == [255, 0, 0]
    assert pixels[LABEL_HEIGHT + 5, 34 + 5].tolist() == [0, 0, 255]
    assert pixels[LABEL_HEIGHT + 30, 5].tolist() == [255, 255, 255]  # below the shorter image: background
    with pytest.raises(ValueError):
        side_by_side(images, ["a", "b"])
    rows = grid([images, images], ["a", "b", "c"])
    assert rows.size == (canvas.width, 2 * canvas.height)


def test_a_label_wider_than_its_image_widens_its_column_in_every_row():
    small = [Image.new("RGB", (20, 20), "red"), Image.new("RGB", (20, 20), "blue")]
    label = "a label much wider than twenty pixels"
    rows = np.asarray(grid([small, small], [label, "b"], gap=4))
    blue_start = label_width(label) + 4  # the second column starts after the label, not over it
    for top in (LABEL_HEIGHT, 2 * LABEL_HEIGHT + 20):  # the second row, unlabelled, keeps the same columns
        assert rows[top + 5, blue_start + 2].tolist() == [0, 0, 255]
        assert rows[top + 5, 30].tolist() == [255, 255, 255]  # past the small image: its cell's background


def test_ms_ssim_clamps_a_negative_scale_at_zero(photo):
    # An inverted image anticorrelates: a negative contrast-structure term counts as 0 (as torchmetrics'
    # normalize="relu"), so the product is 0, not the positive number abs() or an even power would give.
    inverted = 255 - photo.astype(np.int64)
    assert ms_ssim(photo, inverted).item() == 0.0
