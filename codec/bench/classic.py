"""Classic codecs as baselines at a matched rate: JPEG and WebP through Pillow.

For each image, a binary search over the integer quality finds the highest quality whose file (headers
included: that is what a user stores) fits the target bits per pixel. Where even the lowest quality is larger,
that lowest quality is used and the row records that the rate was not met.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, features

CLASSIC = ("jpeg", "webp")
_QUALITY_RANGE = {"jpeg": (1, 100), "webp": (0, 100)}


@dataclass(frozen=True)
class ClassicResult:
    data: bytes
    quality: int
    bpp: float
    met: bool  # whether bpp <= the target


def available(codec: str) -> bool:
    return codec == "jpeg" or (codec == "webp" and features.check("webp"))


def encode(array: np.ndarray, codec: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if codec == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, optimize=True)  # optimised Huffman tables: JPEG at its best
    elif codec == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=6)  # the slowest, smallest setting
    else:
        raise ValueError(f"unknown classic codec {codec!r}; choose one of {', '.join(CLASSIC)}")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def bpp_of(data: bytes, array: np.ndarray) -> float:
    return len(data) * 8 / float(array.shape[0] * array.shape[1])


def match_rate(array: np.ndarray, codec: str, target_bpp: float) -> ClassicResult:
    """The highest quality whose bpp is at most `target_bpp` (file size grows with quality, nearly monotonically:
    every quality tried that fits is remembered, so a small non-monotonic step cannot lose the best fit)."""
    low, high = _QUALITY_RANGE[codec]
    best: ClassicResult | None = None
    lowest: ClassicResult | None = None
    while low <= high:
        quality = (low + high) // 2
        data = encode(array, codec, quality)
        bpp = bpp_of(data, array)
        if bpp <= target_bpp:
            if best is None or quality > best.quality:
                best = ClassicResult(data, quality, bpp, True)
            low = quality + 1
        else:
            if lowest is None or quality < lowest.quality:
                lowest = ClassicResult(data, quality, bpp, False)
            high = quality - 1
    if best is not None:
        return best
    quality = _QUALITY_RANGE[codec][0]
    if lowest is None or lowest.quality != quality:
        data = encode(array, codec, quality)
        lowest = ClassicResult(data, quality, bpp_of(data, array), False)
    return lowest
