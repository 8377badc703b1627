"""Pictures people would rather see than read: side-by-side comparisons and error heat maps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

LABEL_HEIGHT = 18


HEATMAP_FULL_SCALE = 32.0
HEATMAP_LABEL = f"abs error (yellow: {HEATMAP_FULL_SCALE:.0f}+ levels)"


def error_heatmap(
    reference: np.ndarray, reconstruction: np.ndarray, full_scale: float = HEATMAP_FULL_SCALE
) -> Image.Image:
    """Per-pixel mean absolute error as a black-red-yellow map; `full_scale` levels of error saturate it. It stops
    at yellow, not white: the worst errors must not look like the white canvas the pictures sit on."""
    error = np.abs(reference.astype(np.float32) - reconstruction.astype(np.float32)).mean(axis=2)
    t = np.clip(error / full_scale, 0.0, 1.0)
    rgb = np.stack([np.clip(2 * t, 0, 1), np.clip(2 * t - 1, 0, 1), np.zeros_like(t)], axis=2)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def side_by_side(images: Sequence[Image.Image], labels: Sequence[str], gap: int = 4) -> Image.Image:
    """Images in a row, each with its label above it, on a white background."""
    height = max(image.height for image in images)
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for image, label in zip(images, labels, strict=True):
        canvas.paste(image, (x, LABEL_HEIGHT))
        draw.text((x + 4, 3), label, fill="black")
        x += image.width + gap
    return canvas


def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str], gap: int = 4) -> Image.Image:
    """Rows of side-by-side images, labelled once at the top."""
    strips = [side_by_side(row, labels if i == 0 else [""] * len(row), gap) for i, row in enumerate(rows)]
    canvas = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), "white")
    y = 0
    for strip in strips:
        canvas.paste(strip, (0, y))
        y += strip.height
    return canvas
