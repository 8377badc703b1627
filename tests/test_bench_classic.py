"""JPEG and WebP at a matched rate: the quality search finds the best quality that fits."""

from __future__ import annotations

import numpy as np
import pytest

from codec.bench import classic


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:80]
    base = np.stack([x * 3.0, y * 4.0, (x + y) * 1.5], axis=2)
    noise = np.random.default_rng(3).normal(0, 10, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("codec", [c for c in classic.CLASSIC if classic.available(c)])
@pytest.mark.parametrize("target", [0.8, 2.0])
def test_match_rate_is_the_highest_quality_that_fits(image, codec, target):
    found = classic.match_rate(image, codec, target)
    assert found.met and found.bpp <= target
    assert found.bpp == classic.bpp_of(classic.encode(image, codec, found.quality), image)
    if found.quality < 100:
        # Over the whole range, no higher quality fits (checks the binary search against a scan).
        fits = [
            q for q in range(found.quality + 1, 101) if classic.bpp_of(classic.encode(image, codec, q), image) <= target
        ]
        assert not fits
    decoded = classic.decode(found.data)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8


def test_unreachable_rate_uses_the_lowest_quality_and_says_so(image):
    found = classic.match_rate(image, "jpeg", 0.01)
    assert not found.met and found.quality == 1 and found.bpp > 0.01


def test_unknown_codec(image):
    with pytest.raises(ValueError, match="jpeg, webp"):
        classic.encode(image, "gif", 50)
