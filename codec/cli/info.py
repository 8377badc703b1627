"""`codec info`: what a model is: config, parameter counts, latent shape and compression for an image size."""

from __future__ import annotations

import argparse
import json

from codec.cli.common import add_model_options, load_model


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser("info", help="config, parameter counts and latent shape of a model")
    parser.add_argument(
        "--size",
        type=positive_int,
        nargs=2,
        default=(512, 512),
        metavar=("HEIGHT", "WIDTH"),
        help="image size for the latent shape and compression ratio (default 512 512)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_model_options(parser)
    parser.set_defaults(run=run)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive size")
    return value


def count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def describe(vae, height: int, width: int) -> dict:
    config = vae.config
    latent = config.latent_shape(height, width)
    latent_values = latent[0] * latent[1] * latent[2]
    description = {
        "parameters": {
            "encoder+quant_conv": count(vae.encoder) + count(vae.quant_conv),
            "decoder+post_quant_conv": count(vae.decoder) + count(vae.post_quant_conv),
            "total": count(vae),
        },
        "image_size": [height, width],
        "latent_shape": list(latent),
        "values_ratio": 3 * height * width / latent_values,
        "config": config.to_dict(),
    }
    about = getattr(vae, "about", None)
    if about:
        description["about"] = about
    return description


def run(args: argparse.Namespace) -> int:
    vae = load_model(args)
    info = describe(vae, *args.size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if "about" in info:
        print(info["about"])
        print()
    p = info["parameters"]
    print(f"model: {args.model}")
    print(f"parameters: {p['total'] / 1e6:.2f}M (encoder + quant conv {p['encoder+quant_conv'] / 1e6:.2f}M, ", end="")
    print(f"decoder + post-quant conv {p['decoder+post_quant_conv'] / 1e6:.2f}M)")
    print(
        f"{args.size[0]}x{args.size[1]} image -> latent {tuple(info['latent_shape'])}: "
        f"{info['values_ratio']:.0f}x fewer values, factor {vae.config.downsample_factor} per side"
    )
    config = vae.config
    print(f"scaling factor {config.scaling_factor}, shift factor {config.shift_factor}")
    print("config:", json.dumps(config.to_dict()))
    return 0
