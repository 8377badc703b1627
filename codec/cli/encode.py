"""`codec encode IMAGES -o latents.safetensors`: each image's scaled latent in one file (codec.latents_file)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from codec.cli.common import add_model_options, load_model
from codec.cli.outputs import add_overwrite_option, check_outputs, recording
from codec.images import image_to_tensor
from codec.latents_file import LatentsFile, Scaling, file_id, recorded_model_name, write_latents_file


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("encode", help="images -> scaled latents in one .safetensors file")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="latents .safetensors file to write")
    parser.add_argument("--sample", action="store_true", help="sample the posterior instead of taking its mean")
    parser.add_argument("--seed", type=int, default=None, help="seed for --sample (default 0)")
    add_overwrite_option(parser)
    add_model_options(parser)
    parser.set_defaults(run=run)


def check_arguments(args: argparse.Namespace) -> None:
    """Before any work: a bad path late in a long list, or an output that cannot be written, would waste it all."""
    if args.output.is_dir():
        raise ValueError(f"{args.output}: is a folder; -o takes the .safetensors file to write")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:  # what torch's generators take
        raise ValueError(f"--seed must be from -2**63 to 2**64 - 1, got {args.seed}")
    if args.seed is not None and not args.sample:
        raise ValueError("--seed seeds --sample; without it the posterior's mean is taken and there is nothing to seed")
    if args.output.suffix.lower() != ".safetensors":
        raise ValueError(f"{args.output}: latents are written as safetensors; name the file -o NAME.safetensors")
    unusable = [
        f"{path} ({'a folder' if path.is_dir() else 'no such file'})" for path in args.images if not path.is_file()
    ]
    if unusable:
        more = f" and {len(unusable) - 5} more" if len(unusable) > 5 else ""
        raise ValueError(f"cannot read {len(unusable)} input(s): {', '.join(unusable[:5])}{more}")
    check_outputs([args.output], args.overwrite, model=args.model)


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    vae = load_model(args)
    generator = torch.Generator().manual_seed(args.seed or 0)
    latents, sizes = [], []
    for path in tqdm(args.images, desc="encode", unit="img", disable=len(args.images) < 2):
        x = image_to_tensor(path)
        latents.append(vae.encode_latents(x, sample=args.sample, generator=generator)[0])
        sizes.append((int(x.shape[-2]), int(x.shape[-1])))
    record = LatentsFile(
        latents=latents,
        scaling=Scaling.of(vae.config),
        sources=[path.name for path in args.images],
        sizes=sizes,
        model=recorded_model_name(args.model),
        posterior="sample" if args.sample else "mean",
        files=[file_id(path) for path in args.images],
        latent_norm=vae.bn.record() if vae.bn is not None else None,  # FLUX.2: patched and batch-normalised
    )
    with recording([args.output]):
        write_latents_file(args.output, record)
    print(f"wrote {len(latents)} latents to {args.output}")
    return 0
