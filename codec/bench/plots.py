"""The benchmark's plots: per-image PSNR per codec, quality against speed, and PSNR against bits per pixel.

matplotlib is imported inside `write_plots` with the Agg backend: no display is needed, and `import codec`
stays light.
"""

from __future__ import annotations

import math
from pathlib import Path

from codec.atomic import atomic_path

_MARKERS = {"vae": "o", "baseline": "s", "classic": "^"}


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def write_plots(summary: dict, output: Path) -> list[str]:
    """plots/psnr_per_image.png, plots/quality_vs_speed.png, plots/psnr_vs_bpp.png; returns their relative paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not summary["rows"]:
        return []
    written = []
    for name, draw in (
        ("psnr_per_image", _psnr_per_image),
        ("quality_vs_speed", _quality_vs_speed),
        ("psnr_vs_bpp", _psnr_vs_bpp),
    ):
        figure = draw(plt, summary)
        _save(figure, output / "plots" / f"{name}.png")
        plt.close(figure)
        written.append(f"plots/{name}.png")
    return written


def _psnr_per_image(plt, summary: dict):
    from codec.bench.grids import ranked_images

    primary, ranked = ranked_images(summary)
    position = {image: index for index, image in enumerate(ranked)}
    figure, axes = plt.subplots(figsize=(max(6.0, 0.3 * len(ranked) + 3), 4.5))
    for row in summary["rows"]:
        points = sorted((position[r["image"]], r["psnr"]) for r in summary["records"] if r["model"] == row["name"])
        points = [(x, y) for x, y in points if _finite(y)]
        axes.plot(
            [x for x, _ in points],
            [y for _, y in points],
            marker=_MARKERS.get(row["kind"], "o"),
            ms=4,
            label=row["name"],
        )
    axes.set_xticks(range(len(ranked)), ranked, rotation=90, fontsize=7)
    axes.set_xlabel(f"image (sorted by {primary}'s PSNR)")
    axes.set_ylabel("PSNR (dB)")
    axes.set_title("PSNR per image")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def _quality_vs_speed(plt, summary: dict):
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for row in summary["rows"]:
        encode, decode = row["encode_images_per_s"], row["decode_images_per_s"]
        if not (_finite(encode) and _finite(decode) and _finite(row["psnr"])):
            continue
        speed = 1.0 / (1.0 / encode + 1.0 / decode)  # round trips per second
        axes.scatter(speed, row["psnr"], marker=_MARKERS.get(row["kind"], "o"), label=row["name"])
        axes.annotate(row["name"], (speed, row["psnr"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel(f"encode + decode, images/s ({summary['device']}, log scale)")
    axes.set_ylabel("mean PSNR (dB)")
    axes.set_title("Quality against speed")
    axes.grid(alpha=0.3, which="both")
    return figure


def _psnr_vs_bpp(plt, summary: dict):
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for codec, curve in summary.get("rd_curves", {}).items():
        points = [(p["bpp"], p["psnr"]) for p in curve if _finite(p["psnr"])]
        axes.plot([x for x, _ in points], [y for _, y in points], "--", alpha=0.6, label=f"{codec} (fixed qualities)")
    for row in summary["rows"]:
        if _finite(row["bpp"]) and _finite(row["psnr"]):
            axes.scatter(row["bpp"], row["psnr"], marker=_MARKERS.get(row["kind"], "o"), zorder=3, label=row["name"])
    axes.set_xlabel(f"bits per pixel (latents as {summary['latent_precision']})")
    axes.set_ylabel("mean PSNR (dB)")
    axes.set_title("PSNR against rate")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure
