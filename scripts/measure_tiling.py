"""Measure how far tiled encode/decode is from untiled: PSNR of tiled vs untiled output on a real photo.

    python scripts/measure_tiling.py --model DIR --image ../shared/data/kodak/kodim23.png --tile 32

Compares, on the same weights and input: our tiled decode (shared GroupNorm statistics), our tiled
encode+decode, and diffusers' own tiled decode (per-tile statistics) with the same tile size, each against the
untiled result; prints times too. Needs diffusers for the last comparison (skipped if it is missing).
"""

from __future__ import annotations

import argparse
import time

import torch

from codec import AutoencoderKL
from codec.images import image_to_tensor, tensor_to_uint8
from codec.metrics import psnr


def db(reference: torch.Tensor, test: torch.Tensor) -> float:
    return psnr(tensor_to_uint8(reference), tensor_to_uint8(test)).item()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--size", type=int, default=None, help="resize the image to SIZE x SIZE first")
    parser.add_argument("--tile", type=int, default=32, help="tile side in latent pixels")
    args = parser.parse_args(argv)

    vae = AutoencoderKL.load(args.model)
    x = image_to_tensor(args.image)
    if args.size:
        x = torch.nn.functional.interpolate(x, size=(args.size, args.size), mode="bicubic").clamp(-1, 1)
    f = vae.config.downsample_factor
    vae.disable_tiling()
    z, t_encode = timed(lambda: vae.encode(x).latent_dist.mode())
    reference, t_decode = timed(lambda: vae.decode(z).sample)
    vae.enable_tiling(args.tile)
    tiled_decode, t_tiled_decode = timed(lambda: vae.decode(z).sample)
    z_tiled, t_tiled_encode = timed(lambda: vae.encode(x).latent_dist.mode())
    tiled_roundtrip = vae.decode(z_tiled).sample
    print(f"image {tuple(x.shape[-2:])}, latent {tuple(z.shape[-2:])}, tile {args.tile} latent px ({args.tile * f} px)")
    print(f"untiled: encode {t_encode:.2f} s, decode {t_decode:.2f} s")
    print(f"ours, tiled decode vs untiled: {db(reference, tiled_decode):.2f} dB ({t_tiled_decode:.2f} s)")
    print(
        f"ours, tiled encode+decode vs untiled: {db(reference, tiled_roundtrip):.2f} dB (encode {t_tiled_encode:.2f} s)"
    )
    try:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except ImportError:
        print("diffusers not installed: no comparison")
        return
    theirs = DiffusersAutoencoderKL(**vae.config.to_dict()).eval()
    theirs.load_state_dict(vae.state_dict())
    theirs.enable_tiling()
    theirs.tile_latent_min_size = args.tile
    theirs.tile_sample_min_size = args.tile * f
    their_tiled, t_theirs = timed(lambda: theirs.decode(z).sample)
    print(f"diffusers, tiled decode vs our untiled: {db(reference, their_tiled):.2f} dB ({t_theirs:.2f} s)")


if __name__ == "__main__":
    main()
