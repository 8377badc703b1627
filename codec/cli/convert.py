"""`codec convert SRC DST`: a diffusers folder to an LDM single file, or a single file (or hub id) to a folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from codec.cli.common import DTYPES


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="diffusers folder <-> single .safetensors/.ckpt file")
    parser.add_argument("source", help="diffusers folder, hub id, or single file")
    parser.add_argument("destination", type=Path, help="a .safetensors/.ckpt path, or a folder")
    parser.add_argument("--config", help="for a single-file source: preset name (sd, sdxl, flux, sd3) or config.json")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="store the weights in this precision")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from codec.model import AutoencoderKL

    source = Path(args.source)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if source.is_file():
        vae = AutoencoderKL.from_single_file(source, config=args.config, torch_dtype=dtype)
    else:
        vae = AutoencoderKL.load(args.source, torch_dtype=dtype)
    if args.destination.suffix in (".safetensors", ".ckpt"):
        vae.save_single_file(args.destination)
    else:
        vae.save_pretrained(args.destination)
    print(f"wrote {args.destination}")
    return 0
