"""`codec demo`: the whole job on sample photos, offline, in under two minutes on a laptop CPU.

Round-trips the bundled sample photos (or yours) and writes: each reconstruction, one comparison picture
(original, reconstruction, error), an interpolation strip between two images' latents, a few images decoded
from the prior N(0, I), and report.md with PSNR, SSIM, latent shape, compression ratio and time.
"""

from __future__ import annotations

import argparse
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
from codec.images import image_to_tensor, list_images, tensor_to_pil, tensor_to_uint8
from codec.metrics import psnr
from codec.visual import HEATMAP_LABEL, error_heatmap, grid, side_by_side

SAMPLES = Path(__file__).resolve().parents[1] / "assets" / "samples"
INTERPOLATION_STEPS = 7
PRIOR_SAMPLES = 4


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="round-trip sample photos and show what the latent space does")
    parser.add_argument("images", nargs="*", type=Path, help="photos to use (default: the bundled samples)")
    parser.add_argument("-o", "--output", type=Path, default=Path("out/demo"), help="folder (default out/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the prior samples")
    add_model_options(parser)
    parser.set_defaults(run=run)


def _save(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _center_square(x: torch.Tensor, side: int) -> torch.Tensor:
    """Resize the short side to `side` and crop the middle: two images then share one latent shape."""
    h, w = x.shape[-2:]
    scale = side / min(h, w)
    x = torch.nn.functional.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True)
    top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
    return x[..., top : top + side, left : left + side].clamp(-1, 1)


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    from PIL import Image

    paths = args.images or list_images(SAMPLES)
    if not paths:
        raise ValueError(f"{SAMPLES}: no sample photos; pass image paths")
    out = args.output
    check_output_folder(out, "the demo")
    images = [image_to_tensor(path) for path in paths]  # an unreadable photo fails before anything is written
    vae = load_model(args)
    out.mkdir(parents=True, exist_ok=True)
    f, channels = vae.config.downsample_factor, vae.config.latent_channels
    rows, lines, squares = [], [], []
    total_start = time.perf_counter()
    for path, image, stem in zip(paths, images, output_stems([str(path) for path in paths]), strict=True):
        x = image.to(vae.device, vae.dtype)
        start = time.perf_counter()
        z = vae.encode(x).latent_dist.mode()
        reconstruction = vae.decode(z).sample[..., : x.shape[-2], : x.shape[-1]]
        seconds = time.perf_counter() - start
        original, recon = tensor_to_uint8(x)[0], tensor_to_uint8(reconstruction)[0]
        image_psnr, image_ssim = psnr(original, recon).item(), ssim_or_none(original, recon)
        _save(Image.fromarray(recon), out / f"{stem}_reconstruction.png")
        rows.append([Image.fromarray(original), Image.fromarray(recon), error_heatmap(original, recon)])
        ratio = (3 * x.shape[-2] * x.shape[-1]) / z[0].numel()
        lines.append(
            f"| {display_name(Path(path))} | {x.shape[-1]}x{x.shape[-2]} | {tuple(z.shape[1:])} | {ratio:.0f}x "
            f"| {image_psnr:.2f} | {format_ssim(image_ssim)} | {seconds:.2f} |"
        )
        squares.append(_center_square(x.float(), 256).to(vae.dtype))
        print(
            f"{display_name(Path(path))}: PSNR {image_psnr:.2f} dB, SSIM {format_ssim(image_ssim)}, latent {tuple(z.shape[1:])}"
        )
    comparison = grid(rows, ["original", "reconstruction", HEATMAP_LABEL])
    _save(comparison, out / "comparison.png")

    # Interpolation: a straight line between two images' latent means, decoded. A KL-regularised latent space
    # decodes the points in between to plausible cross-fades rather than garbage.
    print(f"interpolation: decoding {INTERPOLATION_STEPS} points between two latents ...", flush=True)
    pair = torch.cat(squares[:2]) if len(squares) > 1 else torch.cat([squares[0], squares[0].flip(-1)])
    ends = vae.encode(pair).latent_dist.mode()
    weights = torch.linspace(0, 1, INTERPOLATION_STEPS, device=ends.device, dtype=ends.dtype).view(-1, 1, 1, 1)
    path_latents = (1 - weights) * ends[:1] + weights * ends[1:2]
    strip = tensor_to_pil(vae.decode(path_latents).sample)
    _save(side_by_side(strip, [f"t={w:.2f}" for w in weights.flatten().tolist()]), out / "interpolation.png")

    # The prior: the KL term pulls every posterior towards N(0, I), so raw latents drawn from it decode to
    # image-like textures (not photos: this is an autoencoder, not a generative model).
    print(f"prior: decoding {PRIOR_SAMPLES} latents drawn from N(0, I) ...", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    side = 256 // f
    noise = torch.randn(PRIOR_SAMPLES, channels, side, side, generator=generator).to(vae.device, vae.dtype)
    prior = tensor_to_pil(vae.decode(noise).sample)
    _save(side_by_side(prior, [f"z ~ N(0, I) #{i}" for i in range(PRIOR_SAMPLES)]), out / "prior_samples.png")

    total = time.perf_counter() - total_start
    report = [
        "# codec demo",
        "",
        f"Model: `{args.model}` ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, factor {f}, "
        f"{channels} latent channels), device {vae.device}, {vae.dtype}.",
        "",
        "| image | size | latent | fewer values | PSNR (dB) | SSIM | encode+decode (s) |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
        "Pictures: `comparison.png` (original, reconstruction, error), `interpolation.png` (decoded straight line "
        "between two latents), `prior_samples.png` (latents drawn from N(0, I), decoded).",
        f"Total time {total:.1f} s.",
    ]
    atomic_write_text(out / "report.md", "\n".join(report) + "\n")
    print(f"wrote {out}/comparison.png, interpolation.png, prior_samples.png and report.md ({total:.1f} s)")
    return 0
