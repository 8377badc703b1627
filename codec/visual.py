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


def label_width(label: str) -> int:
    """Pixels a label needs, margins included: a cell is at least this wide, so labels of small images do not
    run into each other."""
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label)) + 8 if label else 0


def column_widths(rows: Sequence[Sequence[Image.Image]], labels: Sequence[Sequence[str]]) -> list[int]:
    """One width per column, wide enough for every row's image and every label above it."""
    columns = zip(*rows, strict=True)
    label_columns = zip(*labels, strict=True)
    return [
        max(max(image.width for image in column), *(label_width(label) for label in texts))
        for column, texts in zip(columns, label_columns, strict=True)
    ]


def side_by_side(
    images: Sequence[Image.Image], labels: Sequence[str], gap: int = 4, widths: Sequence[int] | None = None
) -> Image.Image:
    """Images in a row, each with its label above it, on a white background; `widths`: each cell's (see
    column_widths), by default as wide as its image or its label."""
    widths = widths or column_widths([images], [labels])
    height = max(image.height for image in images)
    canvas = Image.new("RGB", (sum(widths) + gap * (len(images) - 1), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for image, label, width in zip(images, labels, widths, strict=True):
        canvas.paste(image, (x, LABEL_HEIGHT))
        draw.text((x + 4, 3), label, fill="black")
        x += width + gap
    return canvas


def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str], gap: int = 4) -> Image.Image:
    """Rows of side-by-side images, labelled once at the top."""
    row_labels = [labels if i == 0 else [""] * len(row) for i, row in enumerate(rows)]
    widths = column_widths(rows, row_labels)
    strips = [side_by_side(row, texts, gap, widths) for row, texts in zip(rows, row_labels, strict=True)]
    canvas = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), "white")
    y = 0
    for strip in strips:
        canvas.paste(strip, (0, y))
        y += strip.height
    return canvas
