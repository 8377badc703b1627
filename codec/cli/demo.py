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
from codec.cli.outputs import add_overwrite_option, check_outputs, recording
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
    add_overwrite_option(parser)
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


def _decoded(vae, z: torch.Tensor, what: str) -> torch.Tensor:
    images = vae.decode(z).sample
    if not torch.isfinite(images).all():  # would be saved as black: say so instead
        raise ValueError(f"{what}: the decoded image holds NaN or infinite values (try --dtype fp32)")
    return images


def reconstruct(vae, paths: list[Path], images: list[torch.Tensor], out: Path) -> tuple[list, list[str], list]:
    """Round-trip each photo and write its reconstruction: comparison rows, report lines and 256-pixel squares."""
    from PIL import Image

    rows, lines, squares = [], [], []
    for path, image, stem in zip(paths, images, output_stems([str(path) for path in paths]), strict=True):
        x = image.to(vae.device, vae.dtype)
        start = time.perf_counter()
        z = vae.encode(x).latent_dist.mode()
        reconstruction = _decoded(vae, z, str(path))[..., : x.shape[-2], : x.shape[-1]]
        seconds = time.perf_counter() - start
        original, recon = tensor_to_uint8(x)[0], tensor_to_uint8(reconstruction)[0]
        image_psnr, image_ssim = psnr(original, recon).item(), ssim_or_none(original, recon)
        _save(Image.fromarray(recon), out / f"{stem}_reconstruction.png")
        rows.append([Image.fromarray(original), Image.fromarray(recon), error_heatmap(original, recon)])
        ratio = (3 * x.shape[-2] * x.shape[-1]) / z[0].numel()
        name = display_name(Path(path))
        lines.append(
            f"| {name} | {x.shape[-1]}x{x.shape[-2]} | {tuple(z.shape[1:])} | {ratio:.0f}x "
            f"| {image_psnr:.2f} | {format_ssim(image_ssim)} | {seconds:.2f} |"
        )
        squares.append(_center_square(x.float(), 256).to(vae.dtype))
        print(f"{name}: PSNR {image_psnr:.2f} dB, SSIM {format_ssim(image_ssim)}, latent {tuple(z.shape[1:])}")
    return rows, lines, squares


def interpolate(vae, squares: list[torch.Tensor], out: Path) -> None:
    """A straight line between two images' latent means, decoded: a KL-regularised latent space decodes the
    points in between to plausible cross-fades rather than garbage."""
    print(f"interpolation: decoding {INTERPOLATION_STEPS} points between two latents ...", flush=True)
    pair = torch.cat(squares[:2]) if len(squares) > 1 else torch.cat([squares[0], squares[0].flip(-1)])
    ends = vae.encode(pair).latent_dist.mode()
    weights = torch.linspace(0, 1, INTERPOLATION_STEPS, device=ends.device, dtype=ends.dtype).view(-1, 1, 1, 1)
    path_latents = (1 - weights) * ends[:1] + weights * ends[1:2]
    strip = tensor_to_pil(_decoded(vae, path_latents, "interpolation"))
    _save(side_by_side(strip, [f"t={w:.2f}" for w in weights.flatten().tolist()]), out / "interpolation.png")


def sample_prior(vae, seed: int, out: Path) -> None:
    """The KL term pulls every posterior towards N(0, I), so latents drawn from it decode to image-like textures
    (not photos: this is an autoencoder, not a generative model)."""
    print(f"prior: decoding {PRIOR_SAMPLES} latents drawn from N(0, I) ...", flush=True)
    generator = torch.Generator().manual_seed(seed)
    side = 256 // vae.config.downsample_factor
    noise = torch.randn(PRIOR_SAMPLES, vae.config.latent_channels, side, side, generator=generator)
    prior = tensor_to_pil(_decoded(vae, noise.to(vae.device, vae.dtype), "prior samples"))
    _save(side_by_side(prior, [f"z ~ N(0, I) #{i}" for i in range(PRIOR_SAMPLES)]), out / "prior_samples.png")


def write_report(vae, model: str, lines: list[str], seconds: float, path: Path) -> None:
    config = vae.config
    report = [
        "# codec demo",
        "",
        f"Model: `{model}` ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, factor "
        f"{config.downsample_factor}, {config.latent_channels} latent channels), device {vae.device}, {vae.dtype}.",
        "",
        "| image | size | latent | fewer values | PSNR (dB) | SSIM | encode+decode (s) |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
        "Pictures: `comparison.png` (original, reconstruction, error), `interpolation.png` (decoded straight line "
        "between two latents), `prior_samples.png` (latents drawn from N(0, I), decoded).",
        f"Total time {seconds:.1f} s.",
    ]
    atomic_write_text(path, "\n".join(report) + "\n")


def output_targets(out: Path, paths: list[Path]) -> list[Path]:
    stems = output_stems([str(path) for path in paths])
    named = ["comparison.png", "interpolation.png", "prior_samples.png", "report.md"]
    return [*(out / f"{stem}_reconstruction.png" for stem in stems), *(out / name for name in named)]


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    paths = args.images or list_images(SAMPLES)
    if not paths:
        raise ValueError(f"{SAMPLES}: no sample photos; pass image paths")
    out = args.output
    check_output_folder(out, "the demo")
    targets = output_targets(out, paths)
    check_outputs(targets, args.overwrite, model=args.model)
    images = [image_to_tensor(path) for path in paths]  # an unreadable photo fails before anything is written
    vae = load_model(args)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with recording(targets):
        rows, lines, squares = reconstruct(vae, paths, images, out)
        _save(grid(rows, ["original", "reconstruction", HEATMAP_LABEL]), out / "comparison.png")
        interpolate(vae, squares, out)
        sample_prior(vae, args.seed, out)
        seconds = time.perf_counter() - start
        write_report(vae, args.model, lines, seconds, out / "report.md")
    print(f"wrote {out}/comparison.png, interpolation.png, prior_samples.png and report.md ({seconds:.1f} s)")
    return 0
