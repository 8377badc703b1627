"""`codec bench --model A --model B ... --data SRC -o DIR`: codecs side by side (PSNR, SSIM, MS-SSIM, LPIPS, rFID,
bits per pixel, speed, memory), with JPEG/WebP at the same rate; summary.json/.md, per-image CSV, grids, plots.

Multi-process: `accelerate launch --multi_gpu --num_processes N -m codec bench ...` (also on CPU-only machines,
with gloo): the ranks split the images; a launch that forms no real process group is refused."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from codec.cli.common import DTYPES, check_output_folder, resolve_device
from codec.cli.outputs import refuse_model_paths


def add_parsers(subparsers) -> None:
    from codec.bench.baselines import BASELINES
    from codec.bench.classic import CLASSIC
    from codec.bench.data import PROTOCOLS
    from codec.bench.rate import PRECISIONS

    parser = subparsers.add_parser(
        "bench",
        help="compare codecs: model-card metrics, bits per pixel, speed and memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="MODEL",
        help="repeatable: diffusers folder, single file, hub id, 'builtin', 'preset:NAME' (random weights), "
        f"or a baseline: {', '.join(BASELINES)}. A folder of another diffusers autoencoder (AutoencoderTiny, "
        "AutoencoderDC, AutoencoderKLQwenImage, ...) runs through diffusers' own class",
    )
    parser.add_argument(
        "--data", required=True, help="folder, image, .txt list, .parquet, save_to_disk folder or hub dataset"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the outputs")
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="crop256", help="crop256 (model cards; the default) or full"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the source")
    parser.add_argument("--latent-precision", choices=PRECISIONS, default="fp16", help="latent storage (default fp16)")
    parser.add_argument(
        "--classic",
        default=",".join(CLASSIC),
        help=f"classic codecs at the models' rate, comma-separated (default {','.join(CLASSIC)}; 'none' for none)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="images per encode/decode call (same-size ones; default 8)"
    )
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    parser.add_argument("--no-fid", action="store_true", help="skip rFID")
    parser.add_argument(
        "--grid-images", type=int, default=2, help="how many best and worst images get a grid (default 2)"
    )
    parser.add_argument(
        "--split", default="validation", help="dataset split for `datasets` sources (default validation)"
    )
    parser.add_argument("--image-column", default="image", help="image column for `datasets` sources")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="VAE inference precision")
    parser.set_defaults(run=run)


def _classic_list(text: str) -> tuple[str, ...]:
    from codec.bench.classic import CLASSIC

    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in CLASSIC]
    if unknown:
        raise ValueError(f"--classic: unknown codec(s) {', '.join(unknown)}; choose from {', '.join(CLASSIC)}")
    return names


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (rebuilt from the options, so tests calling main() get it too)."""
    words = ["codec", "bench"]
    for model in args.models:
        words += ["--model", model]
    words += ["--data", args.data, "--protocol", args.protocol, "--latent-precision", args.latent_precision]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    if args.classic != "jpeg,webp":
        words += ["--classic", args.classic]
    words += ["--no-lpips"] * args.no_lpips + ["--no-fid"] * args.no_fid
    defaults = {"batch_size": 8, "grid_images": 2, "device": "auto", "split": "validation", "image_column": "image"}
    for name, default in defaults.items():
        if getattr(args, name) != default:
            words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.dtype != "fp32":
        words += ["--dtype", args.dtype]
    return shlex.join([*words, "-o", str(args.output)])


def run(args: argparse.Namespace) -> int:
    from codec.bench import BenchOptions, bench
    from codec.bench.report import markdown_table

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.grid_images < 0:
        raise ValueError(f"--grid-images must be 0 (no grids) or more, got {args.grid_images}")
    check_output_folder(args.output, "the benchmark")
    for model in args.models:
        refuse_model_paths([args.output / "summary.json"], model)
    options = BenchOptions(
        models=args.models,
        data=args.data,
        output=args.output,
        protocol=args.protocol,
        limit=args.limit,
        latent_precision=args.latent_precision,
        classic=_classic_list(args.classic),
        lpips=not args.no_lpips,
        fid=not args.no_fid,
        batch_size=args.batch_size,
        dtype=DTYPES[args.dtype],
        split=args.split,
        column=args.image_column,
        grid_images=args.grid_images,
    )
    options.command = _command(args)
    summary = bench(options, resolve_device(args.device))
    if summary is not None:
        print(markdown_table(summary))
        print(f"wrote {args.output}/summary.md, summary.json, per_image.csv, grids/, plots/")
    return 0
