"""Comparison grids for the best and worst images: the original and every codec's reconstruction on top,
each reconstruction's error heat map below it. Pixels are shown 1:1 (large images are center-cropped), since
a downscaled picture would hide exactly the artifacts one wants to see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from codec.atomic import atomic_path
from codec.bench.scoring import load_png
from codec.visual import HEATMAP_LABEL, column_widths, error_heatmap, side_by_side

MAX_SIDE = 512


def _crop(array: np.ndarray) -> np.ndarray:
    height, width = array.shape[:2]
    top, left = max(0, (height - MAX_SIDE) // 2), max(0, (width - MAX_SIDE) // 2)
    return array[top : top + MAX_SIDE, left : left + MAX_SIDE]


def ranked_images(summary: dict) -> tuple[str, list[str]]:
    """The row that ranks images (the first VAE, else the first row) and its images, best PSNR first."""
    rows = summary["rows"]
    primary = next((row["name"] for row in rows if row["kind"] == "vae"), rows[0]["name"])
    scores = {r["image"]: r["psnr"] for r in summary["records"] if r["model"] == primary}
    return primary, sorted(scores, key=lambda image: (-scores[image], image))


def comparison(output: Path, image: str, summary: dict) -> Image.Image:
    reference = _crop(load_png(output / "reference" / f"{image}.png"))
    psnr = {r["model"]: r["psnr"] for r in summary["records"] if r["image"] == image}
    top, bottom, labels, heat_labels = [Image.fromarray(reference)], [], [f"{image} original"], [HEATMAP_LABEL]
    blank = Image.new("RGB", (reference.shape[1], reference.shape[0]), "white")
    bottom.append(blank)
    for row in summary["rows"]:
        recon = _crop(load_png(output / "reconstructions" / row["name"] / f"{image}.png"))
        top.append(Image.fromarray(recon))
        bottom.append(error_heatmap(reference, recon))
        labels.append(f"{row['name']} {psnr.get(row['name'], float('nan')):.2f} dB")
        heat_labels.append(f"{row['name']} error")
    widths = column_widths([top, bottom], [labels, heat_labels])
    upper, lower = side_by_side(top, labels, widths=widths), side_by_side(bottom, heat_labels, widths=widths)
    canvas = Image.new("RGB", (upper.width, upper.height + lower.height), "white")
    canvas.paste(upper, (0, 0))
    canvas.paste(lower, (0, upper.height))
    return canvas


def write_grids(summary: dict, output: Path, count: int) -> list[str]:
    """best-K-IMAGE.png and worst-K-IMAGE.png under grids/; returns their paths relative to `output`."""
    if count <= 0 or not summary["rows"]:
        return []
    _, ranked = ranked_images(summary)
    count = min(count, (len(ranked) + 1) // 2)  # best and worst never show the same image twice
    chosen = [("best", i + 1, image) for i, image in enumerate(ranked[:count])]
    chosen += [("worst", i + 1, image) for i, image in enumerate(reversed(ranked[len(ranked) - count :]))]
    written = []
    for label, position, image in chosen:
        if label == "worst" and image in ranked[:count]:
            continue
        path = output / "grids" / f"{label}-{position}-{image}.png"
        with atomic_path(path) as tmp:
            comparison(output, image, summary).save(tmp, format="PNG")
        written.append(str(path.relative_to(output)))
    return written
