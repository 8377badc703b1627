"""How far tiling and bf16 move a model's output: PSNR of tiled against untiled, and of bf16 against fp32.

    python scripts/bench_fidelity.py                                  # embedded model, Kodak, 1024x1024, tile 64
    python scripts/bench_fidelity.py --size 0 --tile 16 --encode --photos ../shared/data/kodak/kodim23.png
    python scripts/bench_fidelity.py --size 64 768 --tile 16 --encode --photos ../shared/data/kodak/kodim23.png

Each photo is scaled to cover --size (one side: a square; two: height and width; 0: the photo's own size) and
center-cropped, encoded untiled (the posterior mean), then decoded untiled and tiled at each --tile (latent
positions): the tiled decode's PSNR against the untiled one, on 8-bit images. --encode adds a tiled encode before
the tiled decode; --diffusers adds diffusers' tiled decode of the same latent with the same weights and tile (it
normalises each tile on its own statistics, where ours share one set across tiles). A difference picture per
photo and tile (x8 around mid-grey: a tone shift between tiles shows as a grid of patches) goes into --out,
beside report.md. The precision rows compare bf16 with fp32 output at --precision-size on the first photo.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from bench_report import DEFAULT_OUT, command_line, default_photos, machine, markdown_table, write_report

from codec import AutoencoderKL
from codec.images import image_to_tensor, tensor_to_pil, tensor_to_uint8
from codec.metrics import psnr

KODAK_NUMBERS = (23, 1, 5, 13, 3, 8, 19, 20)  # varied content: faces, foliage, sky, fine texture


def db(reference: torch.Tensor, test: torch.Tensor) -> float:
    return psnr(tensor_to_uint8(reference.float().cpu()), tensor_to_uint8(test.float().cpu())).item()


def untiled(vae: AutoencoderKL) -> AutoencoderKL:
    """Whole images whatever the memory budget says: the reference every tiled output is held against."""
    vae.disable_tiling()
    vae.memory_budget = float("inf")
    return vae


def tiled(vae: AutoencoderKL, tile: int) -> AutoencoderKL:
    vae.memory_budget = None
    vae.enable_tiling(tile)
    return vae


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (bicubic) to cover height x width, then take the center; a side of 0 keeps the photo's size."""
    h, w = image.shape[-2:]
    height, width = height or h, width or w
    scale = max(height / h, width / w)
    if scale != 1:
        new = (max(height, round(h * scale)), max(width, round(w * scale)))
        image = torch.nn.functional.interpolate(image, size=new, mode="bicubic", antialias=scale < 1).clamp(-1, 1)
        h, w = new
    top, left = (h - height) // 2, (w - width) // 2
    return image[..., top : top + height, left : left + width]


def save_difference(out: Path, name: str, test: torch.Tensor, reference: torch.Tensor) -> None:
    difference = ((test - reference).float() * 8).clamp(-1, 1)
    tensor_to_pil(difference.cpu())[0].save(out / name)


@torch.no_grad()
def tiling_rows(vae: AutoencoderKL, photo: Path, args: argparse.Namespace, theirs=None) -> list[list[str]]:
    """One row per tile size: tiled decode (and, with --encode, tiled encode + decode) against untiled."""
    x = center_crop(image_to_tensor(photo), *args.size).to(args.device)
    z = untiled(vae).encode(x).latent_dist.mode()
    start = time.perf_counter()
    reference = vae.decode(z).sample
    untiled_seconds = time.perf_counter() - start
    rows = []
    for tile in args.tile:
        start = time.perf_counter()
        decoded = tiled(vae, tile).decode(z).sample
        seconds = time.perf_counter() - start
        save_difference(args.out, f"tiled-{tile}-minus-untiled-x8-{photo.stem}.png", decoded, reference)
        row = [photo.name, f"{x.shape[-1]}x{x.shape[-2]}", str(tile), f"{db(reference, decoded):.2f}"]
        if args.encode:
            row.append(f"{db(reference, vae.decode(vae.encode(x).latent_dist.mode()).sample):.2f}")
        if theirs is not None:
            row.append(f"{db(reference, diffusers_tiled_decode(theirs, z, tile)):.2f}")
        rows.append([*row, f"{untiled_seconds:.2f}", f"{seconds:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def diffusers_tiled_decode(theirs, z: torch.Tensor, tile: int) -> torch.Tensor:
    theirs.enable_tiling()
    theirs.tile_latent_min_size = tile
    theirs.tile_sample_min_size = tile * 2 ** (len(theirs.config.block_out_channels) - 1)
    return theirs.decode(z).sample


def diffusers_copy(vae: AutoencoderKL):
    """diffusers' AutoencoderKL holding the same weights, for its own (per-tile statistics) tiled decode."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    theirs = DiffusersAutoencoderKL(**vae.config.to_dict()).eval()
    theirs.load_state_dict({key: value.contiguous() for key, value in vae.state_dict().items()})
    return theirs.to(vae.device)


@torch.no_grad()
def precision_rows(vae: AutoencoderKL, photo: Path, size: int, out: Path) -> list[list[str]]:
    """bf16 decode, and bf16 encode + decode, against fp32 on a size x size center crop of `photo`."""
    x = center_crop(image_to_tensor(photo), size, size).to(vae.device)
    z = untiled(vae).encode(x).latent_dist.mode()
    reference = vae.decode(z).sample
    half = untiled(copy.deepcopy(vae).to(torch.bfloat16))
    decoded = half.decode(z).sample
    roundtrip = half.decode(half.encode(x.bfloat16()).latent_dist.mode()).sample
    save_difference(out, f"bf16-minus-fp32-x8-{photo.stem}.png", roundtrip, reference)
    square = f"{size}x{size}"
    return [
        [f"{photo.name}: bf16 decode against fp32 decode, {square}", f"{db(reference, decoded):.2f}"],
        [f"{photo.name}: bf16 encode + decode against fp32, {square}", f"{db(reference, roundtrip):.2f}"],
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="anything --model loads (default: the embedded model)")
    parser.add_argument("--photos", type=Path, nargs="+", help="default: eight Kodak photos, else a bundled sample")
    parser.add_argument("--size", type=int, nargs="+", default=[1024], help="SIDE, or HEIGHT WIDTH; 0: native")
    parser.add_argument("--tile", type=int, nargs="+", default=[64], help="tile sides in latent positions")
    parser.add_argument("--encode", action="store_true", help="also a tiled encode + decode against untiled")
    parser.add_argument("--diffusers", action="store_true", help="also diffusers' tiled decode (same weights)")
    parser.add_argument("--precision-size", type=int, default=256, help="side of the bf16 check; 0: none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "bench_fidelity", help="report and pictures")
    args = parser.parse_args(argv)
    if len(args.size) > 2:
        parser.error("--size: one side (a square) or HEIGHT WIDTH")
    args.size = args.size * 2 if len(args.size) == 1 else args.size
    args.photos = args.photos or default_photos(KODAK_NUMBERS)
    args.device = torch.device(args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.load(args.model).float().to(args.device).eval()
    theirs = diffusers_copy(vae) if args.diffusers else None
    header = ["photo", "size (WxH)", "tile", "tiled decode dB"]
    header += ["tiled encode + decode dB"] * args.encode + ["diffusers tiled decode dB"] * args.diffusers
    header += ["untiled decode s", "tiled decode s"]
    rows = [row for photo in args.photos for row in tiling_rows(vae, photo, args, theirs)]
    sections = [
        f"## Tiled against untiled output, {args.model} ({time.strftime('%Y-%m-%d')})",
        f"`{command_line('bench_fidelity', argv)}` on {machine(args.device)}. PSNR of the tiled output against "
        "the untiled one (8-bit images); tile sides in latent positions; times are one run each.",
        markdown_table(header, rows),
    ]
    if args.precision_size:
        quality = precision_rows(vae, args.photos[0], args.precision_size, args.out)
        sections += ["bf16 against fp32 output:", markdown_table(["comparison", "PSNR dB"], quality)]
    write_report(args.out, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
