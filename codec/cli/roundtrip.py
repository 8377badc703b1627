"""`codec roundtrip IMAGES -o DIR`: encode and decode each image; write the reconstruction, a comparison
picture (original, reconstruction, error heat map) and a metrics table; print PSNR and SSIM per image."""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import torch

from codec.atomic import atomic_path, atomic_write_text
from codec.cli.common import (
    add_model_options,
    check_output_folder,
    display_name,
    format_ssim,
    load_model,
    output_stems,
    ssim_or_none,
)
from codec.cli.outputs import add_overwrite_option, check_outputs, recording
from codec.images import image_to_tensor, tensor_to_uint8
from codec.metrics import psnr
from codec.visual import HEATMAP_LABEL, error_heatmap, side_by_side

# --tile's tile: a budget-sized tile would cover any image that fits in memory, so tiling would change nothing.
DIFFUSERS_TILE = 64


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("roundtrip", help="encode + decode images; write reconstructions and comparisons")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the outputs")
    parser.add_argument(
        "--tile",
        action="store_true",
        help=f"tile at diffusers' tile, {DIFFUSERS_TILE} latent positions ({8 * DIFFUSERS_TILE} pixels for an f8 "
        "codec; a smaller image runs whole); left out, only where memory requires",
    )
    parser.add_argument(
        "--tile-size", type=int, metavar="N", help="tile at N latent positions, N >= 2 (implies --tile)"
    )
    add_overwrite_option(parser)
    add_model_options(parser)
    parser.set_defaults(run=run)


def _save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def output_targets(args: argparse.Namespace, stems: list[str]) -> list[Path]:
    """Each image's reconstruction and comparison, then metrics.csv; refused where one would replace an input."""
    targets = [args.output / f"{stem}{suffix}.png" for stem in stems for suffix in ("", "_compare")]
    inputs = {Path(path).resolve() for path in args.images}
    clobbered = [str(target) for target in targets if target.resolve() in inputs]
    if clobbered:  # -o is the inputs' own folder: the reconstruction would replace its original
        raise ValueError(f"-o {args.output}: writing there would replace input image(s) {', '.join(clobbered)}")
    return [*targets, args.output / "metrics.csv"]


def roundtrip_one(vae, path: Path, stem: str, output: Path) -> tuple:
    """Encode and decode one image, write its reconstruction and comparison; its row of metrics.csv."""
    from PIL import Image

    x = image_to_tensor(path)
    start = time.perf_counter()
    reconstruction = vae(x.to(vae.device, vae.dtype)).sample
    seconds = time.perf_counter() - start
    if not torch.isfinite(reconstruction).all():  # would be saved as black: say so instead
        raise ValueError(f"{path}: its reconstruction holds NaN or infinite values (try --dtype fp32)")
    original, recon = tensor_to_uint8(x)[0], tensor_to_uint8(reconstruction)[0]
    image_psnr = psnr(original, recon).item()
    image_ssim = ssim_or_none(original, recon)
    _save_png(Image.fromarray(recon), output / f"{stem}.png")
    comparison = side_by_side(
        [Image.fromarray(original), Image.fromarray(recon), error_heatmap(original, recon)],
        ["original", f"reconstruction {image_psnr:.2f} dB", HEATMAP_LABEL],
    )
    _save_png(comparison, output / f"{stem}_compare.png")
    name = display_name(path)
    print(f"{name}: PSNR {image_psnr:.2f} dB  SSIM {format_ssim(image_ssim)}  ({seconds:.2f} s)")
    return (name, original.shape[1], original.shape[0], image_psnr, image_ssim, seconds)


def write_metrics(rows: list[tuple], path: Path) -> None:
    if len(rows) > 1:
        mean_psnr = sum(r[3] for r in rows) / len(rows)
        ssims = [r[4] for r in rows if r[4] is not None]
        mean_ssim = sum(ssims) / len(ssims) if len(ssims) == len(rows) else None  # only where every image has one
        print(f"mean over {len(rows)} images: PSNR {mean_psnr:.2f} dB  SSIM {format_ssim(mean_ssim)}")
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["image", "width", "height", "psnr_db", "ssim", "seconds"])
    writer.writerows(
        [r[0], r[1], r[2], f"{r[3]:.4f}", "" if r[4] is None else f"{r[4]:.5f}", f"{r[5]:.3f}"] for r in rows
    )
    atomic_write_text(path, table.getvalue())


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    check_output_folder(args.output, "the reconstructions")
    if args.tile_size is not None and args.tile_size < 2:
        raise ValueError(f"--tile-size takes a tile side of at least 2 latent positions, got {args.tile_size}")
    tile = args.tile_size or (DIFFUSERS_TILE if args.tile else None)
    stems = output_stems([str(path) for path in args.images])
    targets = output_targets(args, stems)
    check_outputs(targets, args.overwrite, model=args.model)
    for path in args.images:  # every input read once first: a bad one is named before any output is written
        image_to_tensor(path)
    vae = load_model(args, foreign=True)
    if tile is not None:
        vae.enable_tiling(tile)
    args.output.mkdir(parents=True, exist_ok=True)
    with recording(targets):
        rows = [roundtrip_one(vae, path, stem, args.output) for path, stem in zip(args.images, stems, strict=True)]
        write_metrics(rows, args.output / "metrics.csv")
    return 0
