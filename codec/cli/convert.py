"""`codec convert SRC DST`: a diffusers folder to an LDM single file, or a single file (or hub id) to a folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from codec.cli.common import DTYPES
from codec.cli.outputs import add_overwrite_option, check_outputs, recording
from codec.config import PRESETS

WRITTEN_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# Names that look like weights but that no tool loads from us as a single file: a folder so named would mislead.
REFUSED_SUFFIXES = (".bin", ".sft", ".safetensor", ".pkl", ".json")


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="diffusers folder <-> single .safetensors/.ckpt file")
    parser.add_argument("source", help="diffusers folder, hub id, or single file")
    parser.add_argument("destination", type=Path, help="a .safetensors/.ckpt path, or a folder")
    parser.add_argument("--config", help=f"for a single-file source: preset name ({', '.join(PRESETS)}) or config.json")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="store the weights in this precision (default: fp32)"
    )
    add_overwrite_option(parser)
    parser.set_defaults(run=run)


def written_files(destination: Path) -> list[Path]:
    """What the conversion writes (a folder's earlier sharded weights are removed, so their index counts too)."""
    if destination.suffix.lower() in WRITTEN_SUFFIXES:
        return [destination]
    weights = destination / "diffusion_pytorch_model.safetensors"
    return [destination / "config.json", weights, weights.with_name(f"{weights.name}.index.json")]


def run(args: argparse.Namespace) -> int:
    from codec.model import AutoencoderKL

    source = Path(args.source).expanduser()
    dtype = DTYPES[args.dtype] if args.dtype else None
    suffix = args.destination.suffix.lower()
    if suffix in REFUSED_SUFFIXES:
        raise ValueError(
            f"{args.destination}: {suffix} is not a format written here; name a .safetensors or .ckpt file, or a "
            "folder (a diffusers model)"
        )
    if args.config is not None and not source.is_file():
        raise ValueError(f"--config {args.config}: only for a single-file source; {args.source} brings its own config")
    targets = written_files(args.destination)
    check_outputs(targets, args.overwrite, model=args.source)
    if source.is_file():
        vae = AutoencoderKL.from_single_file(source, config=args.config, torch_dtype=dtype)
    else:
        vae = AutoencoderKL.load(args.source, torch_dtype=dtype)
    with recording(targets):
        if suffix in WRITTEN_SUFFIXES:
            vae.save_single_file(args.destination)
        else:
            vae.save_pretrained(args.destination)
        if vae.scaling_is_guess:  # a folder's config.json has no way to mark a guess
            print(
                f"note: {args.destination / 'config.json'} holds scaling_factor {vae.config.scaling_factor}, the "
                "guess warned about above: correct it there (or convert with --config) if the model uses another"
            )
    print(f"wrote {args.destination}")
    return 0
